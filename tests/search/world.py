"""A tiny photo world for the search tests: rendered demo scenes (32 px), a tiny random DINOv2 and
BERT (`tests.heads.tail_world`), their caches written by ``cli extract``, a ``linear`` run trained
on them by ``cli train-head`` (the one that indexes), and a folder of photos to index (the
scenes in sub-folders, plus hidden files and files to report as bad)."""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from extract.demo_data import generate_demo_data
from tests.extract.cli_helpers import run_cli
from tests.heads.tail_world import TailWorld, save_backbones, tail_overrides


@dataclass(frozen=True)
class PhotoWorld:
    """The backbones' world, a trained run and the photo folder built from the scenes."""

    tail: TailWorld
    run: Path
    photos: Path
    good: list[str]

    @property
    def checkpoint(self) -> Path:
        return self.run / "best.pt"


def train(world: TailWorld, out: Path, head: str = "linear", *sets: str) -> Path:
    """``cli train-head`` of ``head`` (one epoch) on the world's last-layer caches."""
    config = out.parent / f"{out.name}.yaml"
    config.write_text(f"head:\n  name: {head}\n")
    overrides = tail_overrides(world, image_tag="dinov2", text_tag="bert", epochs=1)
    overrides = [s for s in overrides if not s.startswith(("head.name=", "head.embed_dim="))]
    code, output = run_cli("train-head", "--config", config, "--out", out, "--no-progress",
                           *[part for s in [*overrides, *sets] for part in ("--set", s)])
    assert code == 0, output
    return out


def make_photo_world(root: Path) -> PhotoWorld:
    """48 scenes, the backbones and their last-layer caches, a ``linear`` run, and a photo folder
    of 10 scenes in two sub-folders (``.jpg`` and ``.JPG``) beside hidden files and a text file."""
    data = root / "data"
    generate_demo_data(data, num_images=48, side=32, seed=4)
    words = (data / "train_caps.txt").read_text().replace(",", " ").replace(":", " ").split()
    tail = TailWorld(data, save_backbones(root / "models", words), root / "features")
    tail.extract()
    run = train(tail, root / "run", "linear", "head.embed_dim=16")
    photos = root / "photos"
    scenes = sorted((data / "images").iterdir())[:10]
    good = []
    for i, scene in enumerate(scenes):
        rel = f"{'trip' if i % 2 else 'home/day'}/{scene.stem}{'.JPG' if i % 3 == 0 else '.jpg'}"
        (photos / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(scene, photos / rel)
        good.append(rel)
    (photos / ".hidden").mkdir()
    shutil.copy(scenes[0], photos / ".hidden" / "secret.jpg")
    shutil.copy(scenes[0], photos / ".dotfile.jpg")
    (photos / "notes.txt").write_text("not a photo")
    return PhotoWorld(tail, run, photos, sorted(good))


