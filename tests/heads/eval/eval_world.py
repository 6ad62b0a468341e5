"""Small caches and tiny heads shared by the evaluation tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from cache.batch import TokenBatch
from cache.store import CacheAttrs, ImageCache, ImageCacheWriter, TextCache, TextCacheWriter
from heads.base import Encoded, FeatureSpec, Head, InteractionHead
from heads.layers import l2norm
from heads.registry import build_head

IMG_DIM, TXT_DIM, REGIONS = 16, 12, 6


def write_split(root: Path, n_img: int = 12, caps_per_image: int = 3, seed: int = 0,
                image_index: list[int] | None = None, split: str = "test") -> tuple[ImageCache, TextCache]:
    """A small image cache (variable region counts) and a text cache (variable lengths) whose
    captions are noisy copies of their image's first tokens (through a fixed random map)."""
    rng = np.random.default_rng(seed)
    tokens = rng.standard_normal((n_img, REGIONS, IMG_DIM)).astype(np.float32)
    lengths = rng.integers(2, REGIONS + 1, size=n_img)
    img_attrs = CacheAttrs(modality="image", encoder="synthetic", weights_id="none",
                           weights_hash="0", dim=IMG_DIM, num_items=n_img, num_tokens=REGIONS,
                           dataset="syn", split=split)
    img_path = root / f"image-{split}.h5"
    with ImageCacheWriter(img_path, img_attrs, [str(i) for i in range(n_img)],
                          [f"{i}.jpg" for i in range(n_img)]) as w:
        w.append(tokens, lengths)
        w.finish()
    index = (np.repeat(np.arange(n_img), caps_per_image) if image_index is None
             else np.asarray(image_index))
    mix = rng.standard_normal((IMG_DIM, TXT_DIM)).astype(np.float32) / 4
    states = []
    for c, i in enumerate(index):
        n = int(rng.integers(2, 8))
        base = tokens[i, rng.integers(0, lengths[i], size=n)] @ mix
        states.append(base + 0.3 * rng.standard_normal((n, TXT_DIM)).astype(np.float32))
    txt_attrs = CacheAttrs(modality="text", encoder="synthetic", weights_id="none",
                           weights_hash="0", dim=TXT_DIM, num_items=len(index), dataset="syn",
                           split=split)
    txt_path = root / f"text-{split}.h5"
    with TextCacheWriter(txt_path, txt_attrs, [list(range(len(s))) for s in states],
                         [f"caption {c}" for c in range(len(index))], index) as w:
        w.append(states)
        w.finish()
    return ImageCache(img_path), TextCache(txt_path)


class TinyInteraction(InteractionHead):
    """Mean over words of the best region cosine, after a text projection (``score`` is the base
    class's all-pairs default, built on ``score_pairs``)."""

    def __init__(self, image_spec: FeatureSpec, text_spec: FeatureSpec) -> None:
        super().__init__(image_spec, text_spec)
        self.proj = nn.Linear(text_spec.dim, image_spec.dim)

    def encode_images(self, batch: TokenBatch) -> Encoded:
        return {"tokens": l2norm(batch.tokens), "mask": batch.mask}

    def encode_texts(self, batch: TokenBatch) -> Encoded:
        return {"tokens": l2norm(self.proj(batch.tokens)), "mask": batch.mask}

    def score_pairs(self, images: Encoded, texts: Encoded) -> Tensor:
        sims = texts["tokens"] @ images["tokens"].transpose(1, 2)          # [P, W, R]
        sims = sims.masked_fill(~images["mask"].unsqueeze(1), float("-inf")).amax(dim=2)
        words = texts["mask"].float()
        return (sims.masked_fill(~texts["mask"], 0) * words).sum(1) / words.sum(1)


class TwoBranch(TinyInteraction):
    """A head with a global embedding branch and a local interaction branch (like TGDT)."""

    modes = {"global": "embedding", "local": "interaction"}

    def encode_images(self, batch: TokenBatch) -> Encoded:
        out = super().encode_images(batch)
        return {**out, "emb": l2norm((out["tokens"] * out["mask"].unsqueeze(-1)).sum(1))}

    def encode_texts(self, batch: TokenBatch) -> Encoded:
        out = super().encode_texts(batch)
        return {**out, "emb": l2norm((out["tokens"] * out["mask"].unsqueeze(-1)).sum(1))}

    def score(self, images: Encoded, texts: Encoded) -> Tensor:
        if self.score_kind == "embedding":
            return images["emb"] @ texts["emb"].t()
        return super().score(images, texts)

    def score_pairs(self, images: Encoded, texts: Encoded) -> Tensor:
        if self.score_kind == "embedding":
            return (images["emb"] * texts["emb"]).sum(-1)
        return super().score_pairs(images, texts)


def specs(image: ImageCache, text: TextCache) -> tuple[FeatureSpec, FeatureSpec]:
    return FeatureSpec.from_cache(image), FeatureSpec.from_cache(text)


def interaction_heads(image: ImageCache, text: TextCache) -> list[Head]:
    """The tiny test head (all-pairs default ``score``) and SCAN (a real vectorised ``score``)."""
    torch.manual_seed(0)
    return [TinyInteraction(*specs(image, text)),
            build_head("scan", *specs(image, text), embed_dim=8)]


def recalls_of_ranks(i2t: np.ndarray, t2i: np.ndarray) -> dict[str, float]:
    """The reported metrics of 0-based best ground-truth ranks per query, written out plainly."""
    out = {}
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = 100.0 * np.mean(ranks < k)
        out[f"{name}_medr"] = float(np.floor(np.median(ranks)) + 1)
        out[f"{name}_meanr"] = float(ranks.mean() + 1)
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
    return out
