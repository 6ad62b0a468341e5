"""Tiny structured feature caches written with the real cache writers (for trainer/CLI tests).

Each image shows a few "concepts" out of a fixed set; its tokens are a prefix token (the mean of its
regions), one region per concept and a few distractor regions, in random order, padded to ``T``
with variable lengths. Each caption is ``[CLS]``, one word per concept, a few stop words and
``[SEP]`` (prefix 1, suffix 1). The image and caption sides use different random bases, so a head
must learn the mapping; chance R@1 is 1 / number of images.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cache.store import CacheAttrs, ImageCacheWriter, TextCacheWriter, default_cache_path

IMAGE_TAG, TEXT_TAG = "synimg", "syntxt"


@dataclass(frozen=True)
class World:
    """The shared concept vectors of every split drawn from it."""

    seed: int = 0
    concepts: int = 24
    image_dim: int = 32
    text_dim: int = 28
    per_item: int = 3
    noise: float = 0.2
    num_tokens: int = 8
    grid: tuple[int, int] | None = None   # patch tokens on a grid (every image full length)

    def bases(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        rng = np.random.default_rng(self.seed)
        return (rng.standard_normal((self.concepts, self.image_dim)),
                rng.standard_normal((self.concepts, self.text_dim)),
                rng.standard_normal((4, self.text_dim)),      # stop words
                rng.standard_normal((2, self.text_dim)))      # [CLS], [SEP]


def write_split(root: Path, split: str, n_images: int, world: World = World(), seed: int = 1,
                captions_per_image: int = 5, dataset: str = "syn", encoder: str = "synthetic",
                weights_hash: str = "h0", layer: int = -1) -> tuple[Path, Path]:
    """Write ``<root>/<dataset>/<split>/{image-synimg,text-syntxt}.h5``; returns both paths."""
    img_basis, txt_basis, stops, special = world.bases()
    rng = np.random.default_rng([seed, zlib.crc32(split.encode())])
    t = world.num_tokens if world.grid is None else 1 + world.grid[0] * world.grid[1]
    tokens = np.zeros((n_images, t, world.image_dim), np.float32)
    lengths = np.zeros(n_images, np.int32)
    states, input_ids, captions, image_index = [], [], [], []
    for i in range(n_images):
        shown = rng.permutation(world.concepts)[:world.per_item]
        n_distract = (t - 1 - world.per_item if world.grid is not None
                      else int(rng.integers(1, t - world.per_item)))
        regions = np.concatenate([img_basis[shown],
                                  0.5 * rng.standard_normal((n_distract, world.image_dim))])
        regions = regions[rng.permutation(len(regions))]
        regions += world.noise * rng.standard_normal(regions.shape)
        row = np.concatenate([regions.mean(0, keepdims=True), regions])
        tokens[i, :len(row)], lengths[i] = row, len(row)
        for _ in range(captions_per_image):
            words = np.concatenate([txt_basis[shown],
                                    stops[rng.integers(0, 4, int(rng.integers(1, 4)))]])
            words = words[rng.permutation(len(words))]
            words += world.noise * rng.standard_normal(words.shape)
            states.append(np.concatenate([special[:1], words, special[1:]]).astype(np.float32))
            input_ids.append(list(range(101, 101 + len(states[-1]))))
            captions.append(f"caption {len(captions)} of image {i}")
            image_index.append(i)
    image_path = default_cache_path(root, dataset, split, "image", IMAGE_TAG)
    text_path = default_cache_path(root, dataset, split, "text", TEXT_TAG)
    common = dict(encoder=encoder, weights_id="synthetic", weights_hash=weights_hash,
                  layer=layer, dataset=dataset, split=split)
    with ImageCacheWriter(image_path, CacheAttrs("image", dim=world.image_dim, num_items=n_images,
                                                 num_tokens=t, prefix_tokens=1, grid=world.grid,
                                                 **common),
                          ids=[str(i) for i in range(n_images)],
                          paths=[f"{i}.jpg" for i in range(n_images)]) as w:
        w.append(tokens, lengths)
        w.finish()
    with TextCacheWriter(text_path, CacheAttrs("text", dim=world.text_dim, num_items=len(states),
                                               prefix_tokens=1, suffix_tokens=1, **common),
                         input_ids=input_ids, captions=captions, image_index=image_index) as w:
        w.append(states)
        w.finish()
    return image_path, text_path


def write_dataset(root: Path, train: int = 120, dev: int = 40, test: int = 40,
                  world: World = World(), **kwargs: object) -> Path:
    """Train/dev/test splits of one world under ``root``; returns ``root``."""
    for split, n in (("train", train), ("dev", dev), ("test", test)):
        write_split(root, split, n, world, **kwargs)  # type: ignore[arg-type]
    return root


def config_overrides(root: Path, head: str | None = "linear", **optim: object) -> list[str]:
    """``--set`` strings pointing a config at the synthetic caches under ``root``."""
    out = [f"data.features={root}", "data.dataset=syn", f"data.image={IMAGE_TAG}",
           f"data.text={TEXT_TAG}", "run.device=cpu", "run.log_every=5", "data.preload=none",
           "run.tensorboard=false"] + ([f"head.name={head}"] if head else [])
    out += [f"optim.{k}={v}" for k, v in optim.items()]
    return out
