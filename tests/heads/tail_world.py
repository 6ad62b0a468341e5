"""Layer-K caches of tiny random backbones, written by the real ``cli extract`` (tail-source tests).

Rendered demo scenes (``extract.demo_data``, 32 px) and a tiny DINOv2 and BERT (hidden 32, three
layers, random init) saved with ``save_pretrained`` like a downloaded snapshot; ``cli extract``
writes each split at layer ``LAYER`` of both (tags ``dinov2_l1`` / ``bert_l1``) and at the last
layer (tags ``dinov2`` / ``bert``). DINOv2 has no dropout, BERT keeps its 0.1.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from cache.store import ImageCache, TextCache
from extract.demo_data import generate_demo_data
from tests.extract.cli_helpers import run_cli

LAYER = 1
DATASET = "f30k"
TINY = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64)


@dataclass(frozen=True)
class TailWorld:
    """Where a tail world lives: the caption data, the backbone folders and the cache tree."""

    data: Path
    models: dict[str, Path]
    features: Path

    def extract(self, *args: object, out: Path | None = None) -> None:
        """``cli extract`` of both backbones over every split into ``out`` (default: the tree)."""
        code, output = run_cli(
            "extract", "--backbone", "dinov2", "--weights", self.models["dinov2"],
            "--resolution", 32, "--text-encoder", "bert", "--text-weights", self.models["bert"],
            "--dataset", DATASET, "--data-path", self.data, "--images", self.data / "images",
            "--max-length", 48, "--out", out or self.features, "--device", "cpu", "--workers", 0,
            *args)
        assert code == 0, output


def save_backbones(root: Path, words: list[str]) -> dict[str, Path]:
    """Tiny random DINOv2 (patch 8) and BERT (a vocabulary of ``words``) model folders."""
    from transformers import BertConfig, BertModel, BertTokenizer, Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(image_size=32, patch_size=8, **TINY)).save_pretrained(root / "dinov2")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(words))
    torch.manual_seed(1)
    BertModel(BertConfig(vocab_size=len(vocab), max_position_embeddings=64, **TINY),
              add_pooling_layer=False).save_pretrained(root / "bert")
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(vocab=str(root / "vocab.txt")).save_pretrained(root / "bert")
    return {"dinov2": root / "dinov2", "bert": root / "bert"}


def make_tail_world(root: Path, num_images: int = 96) -> TailWorld:
    """Demo data (train 80 / dev 8 / test 8 images of 96), backbones, caches at layer K and -1."""
    data = root / "data"
    generate_demo_data(data, num_images=num_images, side=32, seed=4)
    words = (data / "train_caps.txt").read_text().replace(",", " ").replace(":", " ").split()
    world = TailWorld(data, save_backbones(root / "models", words), root / "features")
    world.extract("--layer", LAYER, "--text-layer", LAYER, "--tag", f"dinov2_l{LAYER}",
                  "--text-tag", f"bert_l{LAYER}")
    world.extract()
    return world


def split_caches(world: TailWorld, split: str, image_tag: str = f"dinov2_l{LAYER}",
                 text_tag: str = f"bert_l{LAYER}") -> tuple[ImageCache, TextCache]:
    """The image and text caches of one split of the world."""
    folder = world.features / DATASET / split
    return (ImageCache(folder / f"image-{image_tag}.h5"), TextCache(folder / f"text-{text_tag}.h5"))


def copy_backbones(world: TailWorld, root: Path) -> TailWorld:
    """The same world with its own copy of the backbone folders (to change the weights later);
    no caches yet."""
    models = {name: Path(shutil.copytree(folder, root / "models" / name))
              for name, folder in world.models.items()}
    return TailWorld(world.data, models, root / "features")


def tail_overrides(world: TailWorld, image: str = "cache", text: str = "cache",
                   image_tag: str = f"dinov2_l{LAYER}", text_tag: str = f"bert_l{LAYER}",
                   **optim: object) -> list[str]:
    """``--set`` strings of a small linear-head run on the world's caches with these sources."""
    optim = {"epochs": 2, "batch_size": 40, "lr": 0.01, "milestones": "[]", **optim}
    return [f"data.features={world.features}", f"data.dataset={DATASET}",
            f"data.image={image_tag}", f"data.text={text_tag}", f"data.image_source={image}",
            f"data.text_source={text}", "data.preload=none", "run.device=cpu",
            "run.log_every=5", "run.tensorboard=false", "head.name=linear", "head.embed_dim=16",
            "loss.name=infonce"] + [f"optim.{k}={v}" for k, v in optim.items()]


def train_cli(out: Path, sets: list[str]) -> tuple[int, str]:
    """``cli train-head --config <a linear head> --out OUT`` with ``--set`` options."""
    config = out.parent / "linear.yaml"
    config.write_text("head:\n  name: linear\n")
    return run_cli("train-head", "--config", config, "--out", out, "--no-progress",
                   *[part for item in sets for part in ("--set", item)])


def assert_refused(out: Path, sets: list[str], *needles: str) -> None:
    """``train_cli`` into ``out`` exits with status 2, a message holding every needle, and no
    run folder."""
    code, message = train_cli(out, sets)
    assert code == 2 and all(n in message for n in needles), message
    assert not out.exists()
