"""Every registered head can fit a few dozen training pairs (``train.fit_check``), and
``cli check-fit`` reports it as a table and JSON, failing when a head does not fit."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from cache.store import ImageCache, TextCache
from cli import cli
from heads.registry import list_heads
from train.config import cache_paths, load_config
from train.fit_check import fit_pairs, fit_subset
from tests.heads.synthetic_caches import World, config_overrides, write_dataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Small sizes per head (the fit check only asks whether the head and its loss can learn).
SMALL: dict[str, dict[str, Any]] = {
    "linear": dict(embed_dim=32),
    "vse": dict(embed_dim=32),
    "scan": dict(embed_dim=32),
    "laps": dict(embed_dim=32),
    "caa": dict(embed_dim=32),
    "hrem": dict(embed_dim=32, heads=2, graph_warmup_steps=0),
    "tgdt": dict(embed_dim=32, ff_dim=64, heads=2, local_layers=1, global_layers=1,
                 dropout=0.0),
    "aladin": dict(stage="joint", embed_dim=32, teacher_ff_dim=64, student_ff_dim=32,
                   teacher_layers=1, student_layers=1, heads=2, dropout=0.0),
}
NUM_IMAGES = 24


@pytest.fixture(scope="module")
def features(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic caches whose images are a 3 x 3 patch grid plus a mean token (every head,
    CAA's grid included, can read them)."""
    return write_dataset(tmp_path_factory.mktemp("fit"), train=NUM_IMAGES, dev=8, test=8,
                         world=World(grid=(3, 3), concepts=32))


def _config_file(folder: Path, head: str, lr: float) -> Path:
    options = "\n".join(f"  {k}: {v}" for k, v in SMALL.get(head, {}).items())
    path = folder / f"{head}.yaml"
    path.write_text(f"head:\n  name: {head}\n{options}\nloss:\n  name: infonce\n"
                    f"optim:\n  lr: {lr}\n  batch_size: 32\n")
    return path


def _config(features: Path, head: str, lr: float = 3e-3) -> dict[str, Any]:
    path = _config_file(features, head, lr)
    return load_config(path, config_overrides(features, head=None))


def test_fit_subset_holds_the_first_images_and_all_their_captions(features: Path) -> None:
    config = _config(features, "linear")
    images, texts = cache_paths(config, "train")
    img, txt, caption_image = fit_subset(ImageCache(images), TextCache(texts), 5)
    assert img.tokens.shape[0] == 5
    assert caption_image.tolist() == [i for i in range(5) for _ in range(5)]
    assert txt.tokens.shape[0] == 25


@pytest.mark.parametrize("head", list_heads())
def test_every_head_fits_its_training_pairs(features: Path, head: str) -> None:
    config = _config(features, head)
    images, texts = cache_paths(config, "train")
    result = fit_pairs(config, ImageCache(images), TextCache(texts), num_images=NUM_IMAGES,
                       max_steps=400, check_every=25, target=0.95)
    assert result.reached, (head, result.branches)
    assert result.pairs == NUM_IMAGES * 5
    for branch in result.branches.values():
        assert min(branch.values()) >= 95.0


def test_only_the_branches_a_stage_trains_are_checked(features: Path) -> None:
    config = _config(features, "aladin")
    config["head"]["stage"] = "teacher"          # the student is not trained in this stage
    images, texts = cache_paths(config, "train")
    result = fit_pairs(config, ImageCache(images), TextCache(texts), num_images=NUM_IMAGES,
                       max_steps=400, check_every=25)
    assert list(result.branches) == ["teacher"] and result.reached


def test_a_head_that_cannot_fit_is_reported_and_fails_the_command(features: Path,
                                                                   tmp_path: Path) -> None:
    good = _config_file(tmp_path, "linear", 3e-3)
    still = tmp_path / "still.yaml"     # lr 0: the head never moves from chance
    still.write_text(good.read_text().replace("lr: 0.003", "lr: 0.0"))
    report = tmp_path / "fit.json"
    args = ["check-fit", "--config", str(good), "--config", str(still), "--num-images", "12",
            "--max-steps", "150", "--check-every", "50", "--report", str(report)]
    for override in config_overrides(features, head=None):
        args += ["--set", override]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1, result.output
    rows = [line for line in result.stdout.splitlines() if line.startswith(str(tmp_path))]
    assert len(rows) == 2 and rows[0].endswith("yes") and rows[1].endswith("NO")
    saved = json.loads(report.read_text())
    assert saved["results"][str(good)]["reached"] is True
    assert saved["results"][str(still)]["reached"] is False
    assert saved["results"][str(still)]["pairs"] == 60


def test_too_many_images_is_an_error_naming_the_cache(features: Path) -> None:
    config = _config(features, "linear")
    images, texts = cache_paths(config, "train")
    with pytest.raises(Exception, match=str(images)):
        fit_pairs(config, ImageCache(images), TextCache(texts), num_images=10_000)
