"""A tiny world for the picture tests: rendered demo scenes (32 px), a tiny random DINOv2 (patch 8:
a 4 x 4 grid after one CLS token) and BERT saved like downloaded snapshots, their caches written by
the real ``cli extract``, and heads trained on them by the real ``cli train-head``."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from extract.demo_data import generate_demo_data
from tests.extract.cli_helpers import run_cli
from tests.heads.tail_world import DATASET, TailWorld, save_backbones

LAYER = 1
# run folder -> head and its small options (and the caches / sources of the tail run)
RUNS: dict[str, tuple[str, list[str]]] = {
    "linear": ("linear", ["head.embed_dim=16"]),
    "laps": ("laps", ["head.embed_dim=16"]),
    "caa": ("caa", ["head.embed_dim=16"]),
    "scan": ("scan", ["head.embed_dim=16"]),
    "tgdt": ("tgdt", ["head.embed_dim=16", "head.heads=2", "head.ff_dim=32",
                      "head.local_layers=1", "head.global_layers=1"]),
    "linear_tail": ("linear", ["head.embed_dim=16", f"data.image=dinov2_l{LAYER}",
                               f"data.text=bert_l{LAYER}", "data.image_source=tail",
                               "data.text_source=tail"]),
    "linear_e2e": ("linear", ["head.embed_dim=16", "data.image_source=e2e",
                              "data.text_source=e2e"]),
}


@dataclass(frozen=True)
class VizWorld:
    """Where the world lives: its data (images, captions), backbones, caches and runs."""

    tail: TailWorld
    runs: Path

    @property
    def image(self) -> Path:
        return self.tail.data / "images" / "scene_00000.jpg"

    @property
    def caption(self) -> str:
        return (self.tail.data / "train_caps.txt").read_text().splitlines()[0]

    def run(self, name: str) -> Path:
        return self.runs / name


def train(world: TailWorld, run: str, out: Path, epochs: int = 2) -> None:
    """``cli train-head`` of the small head of ``run`` (``RUNS``) on the world's caches."""
    head, options = RUNS[run]
    config = out.parent / f"{run}.yaml"
    config.write_text(f"head:\n  name: {head}\n")
    sets = [f"data.features={world.features}", f"data.dataset={DATASET}", "data.image=dinov2",
            "data.text=bert", "data.preload=none", "data.image_token_drop=0",
            "data.text_token_drop=0", "run.device=cpu", "run.log_every=2", "run.threads=1",
            "run.tensorboard=false", "loss.name=infonce", f"optim.epochs={epochs}",
            "optim.batch_size=30", "optim.lr=0.01", "optim.milestones=[1]", *options]
    code, output = run_cli("train-head", "--config", config, "--out", out, "--no-progress",
                           *[part for item in sets for part in ("--set", item)])
    assert code == 0, output


def make_viz_world(root: Path) -> VizWorld:
    """36 scenes (30 train, 3 dev, 3 test), the tiny backbones, their caches (last layer and layer
    ``LAYER``), the runs of ``RUNS``."""
    data = root / "data"
    generate_demo_data(data, num_images=36, side=32, seed=5)
    words = (data / "train_caps.txt").read_text().replace(",", " ").replace(":", " ").split()
    world = TailWorld(data, save_backbones(root / "models", words), root / "features")
    world.extract()
    world.extract("--layer", LAYER, "--text-layer", LAYER, "--tag", f"dinov2_l{LAYER}",
                  "--text-tag", f"bert_l{LAYER}")
    runs = root / "runs"
    runs.mkdir()
    for run in RUNS:
        train(world, run, runs / run)
    return VizWorld(world, runs)
