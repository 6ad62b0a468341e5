"""The trainer on tiny synthetic caches: learning, exact resume, checkpoints, guards."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cache.errors import CacheMismatchError, InputError
from cache.store import ImageCache, TextCache
from heads.checkpoint import load_checkpoint
from heads.losses import build_loss
from heads.model import RetrievalModel, head_from_checkpoint
from heads.models.linear import LinearHead
from train.config import load_config
from train.trainer import (NonFiniteLossError, Trainer, evaluate_split, lr_factor, param_groups,
                           train)
from tests.heads.synthetic_caches import (IMAGE_TAG, TEXT_TAG, World, config_overrides,
                                          write_dataset, write_split)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def features(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("features"), train=60, dev=40, test=20)


def _config(features: Path, *extra: str, **optim: object) -> dict:
    optim = {"epochs": 2, "batch_size": 50, "lr": 0.003, "milestones": "[]", **optim}
    return load_config(None, config_overrides(features, **optim) + ["loss.name=infonce",
                                                                     "head.embed_dim=64", *extra])


def test_training_lifts_recall_far_above_chance(features: Path, tmp_path: Path) -> None:
    summary = train(_config(features, epochs=3, lr=0.01), tmp_path / "run", show_progress=False)
    dev = summary.history[-1]["dev"]
    chance = 100 / 40
    assert dev["t2i_r1"] > 10 * chance and dev["i2t_r1"] > 10 * chance, dev
    assert summary.history[0]["loss"] > summary.history[-1]["loss"]
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [0, 1, 2]
    assert {"step", "loss", "lr", "dev", "seconds"} <= set(epochs[0])
    assert any(r["kind"] == "step" for r in records)
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    assert best["epoch"] == summary.best_epoch and best["best_rsum"] == summary.best_rsum
    assert best["features"]["image"]["encoder"] == "synthetic"
    assert (tmp_path / "run" / "config.yaml").exists()


def test_resume_continues_exactly(features: Path, tmp_path: Path) -> None:
    extra = ("data.image_token_drop=0.2", "data.text_token_drop=0.2", "optim.warmup_steps=3",
             "optim.milestones=[1]")
    full = train(_config(features, *extra), tmp_path / "full", show_progress=False)
    first = train(_config(features, *extra, epochs=1), tmp_path / "cut", show_progress=False)
    assert first.history[0]["loss"] == full.history[0]["loss"]
    config = load_config(None, [], base=load_checkpoint(tmp_path / "cut" / "last.pt")["config"])
    config["optim"]["epochs"] = 2
    resumed = train(config, tmp_path / "cut", resume=True, show_progress=False)
    assert [h["epoch"] for h in resumed.history] == [1]
    assert resumed.history[0]["loss"] == full.history[1]["loss"]
    assert resumed.history[0]["dev"] == full.history[1]["dev"]
    assert resumed.history[0]["lr"] == full.history[1]["lr"]
    a = load_checkpoint(tmp_path / "full" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "cut" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = (tmp_path / "cut" / "log.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in log if '"kind": "epoch"' in r] == [0, 1]


def test_checkpoint_rebuilds_the_head(features: Path, tmp_path: Path) -> None:
    config = _config(features, epochs=1)
    summary = train(config, tmp_path / "run", show_progress=False)
    state = load_checkpoint(tmp_path / "run" / "best.pt")
    dev_images = ImageCache(features / "syn" / "dev" / f"image-{IMAGE_TAG}.h5")
    dev_texts = TextCache(features / "syn" / "dev" / f"text-{TEXT_TAG}.h5")
    head = head_from_checkpoint(state, dev_images, dev_texts)
    metrics = evaluate_split(head, dev_images, dev_texts, config["eval"], torch.device("cpu"))
    assert metrics["metrics"] == summary.history[0]["dev"]


def test_guards_before_training(features: Path, tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    train(_config(features, epochs=1), tmp_path / "run", show_progress=False)
    with pytest.raises(InputError, match="--resume"):
        Trainer(_config(features), tmp_path / "run")
    other = tmp_path / "other"
    write_split(other, "train", 20)
    write_split(other, "dev", 10, weights_hash="different")
    with pytest.raises(CacheMismatchError, match=r"dev/image-synimg\.h5.*weights_hash"):
        Trainer(_config(other), tmp_path / "run2")
    small = tmp_path / "small"
    write_split(small, "train", 20, world=World(image_dim=8))
    write_split(small, "dev", 10)
    with pytest.raises(CacheMismatchError, match=r"dev/image-synimg\.h5.*dim"):
        Trainer(_config(small), tmp_path / "run3")
    monkeypatch.setattr(LinearHead, "requires_grid", True)   # as if the head needed a patch grid
    with pytest.raises(InputError, match=r"image-synimg\.h5.*grid"):
        Trainer(_config(features), tmp_path / "run4")
    monkeypatch.undo()
    with pytest.raises(InputError, match="optim.lr_mult"):
        Trainer(_config(features, "optim.lr_mult.no_such_module=0.1"), tmp_path / "run5")


def test_warm_start_loads_another_runs_weights(features: Path, tmp_path: Path) -> None:
    train(_config(features, epochs=1), tmp_path / "source", show_progress=False)
    best = tmp_path / "source" / "best.pt"
    trainer = Trainer(_config(features, f"init.checkpoint={best}"), tmp_path / "warm")
    source = load_checkpoint(best)["model"]
    assert all(torch.equal(trainer.head.state_dict()[k], source[k]) for k in source)
    fresh = Trainer(_config(features), tmp_path / "fresh")
    assert not torch.equal(fresh.head.image_fc.weight, source["image_fc.weight"])
    with pytest.raises(InputError, match=r"best\.pt.*'image_fc\.weight'.*\(64, 32\)"):
        Trainer(_config(features, f"init.checkpoint={best}", "head.embed_dim=32"), tmp_path / "w2")
    other = tmp_path / "other"
    write_split(other, "train", 20, weights_hash="different")
    write_split(other, "dev", 10, weights_hash="different")
    with pytest.raises(CacheMismatchError, match=r"train/image-synimg\.h5.*warm-start"):
        Trainer(_config(other, f"init.checkpoint={best}"), tmp_path / "w3")
    with pytest.raises(InputError, match=r"no_run/best\.pt: checkpoint not found"):
        Trainer(_config(features, f"init.checkpoint={tmp_path / 'no_run' / 'best.pt'}"),
                tmp_path / "w4")


def test_grid_heads_turn_image_token_drop_off(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from cache.store import CacheAttrs, ImageCacheWriter
    root = write_dataset(tmp_path / "f", train=20, dev=10, test=10)
    for split, n in (("train", 20), ("dev", 10)):   # the same images on a 2 x 3 grid (+ 1 prefix)
        path = root / "syn" / split / f"image-{IMAGE_TAG}.h5"
        old = ImageCache(path)
        tokens, lengths = old.read(np.arange(n))
        path.unlink()
        attrs = CacheAttrs("image", "synthetic", "synthetic", "h0", old.attrs.dim, n,
                           num_tokens=7, prefix_tokens=1, grid=(2, 3), dataset="syn", split=split)
        with ImageCacheWriter(path, attrs, old.ids, old.paths) as w:
            w.append(tokens[:, :7])
            w.finish()
    monkeypatch.setattr(LinearHead, "requires_grid", True)
    trainer = Trainer(_config(root, "data.image_token_drop=0.3", batch_size=20), tmp_path / "run",
                      show_progress=False)
    assert trainer.dataset.image_drop.p == 0.0 and trainer.dataset.text_drop.p > 0
    assert "image token drop 0.3 is turned off" in capsys.readouterr().out


def test_non_finite_loss_stops_naming_the_step(features: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    original = LinearHead.training_loss
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        loss, logs = original(self, *args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 3 else loss), logs

    monkeypatch.setattr(LinearHead, "training_loss", poisoned)
    with pytest.raises(NonFiniteLossError, match="epoch 0, step 2"):
        train(_config(features), tmp_path / "run", show_progress=False)
    assert not (tmp_path / "run" / "last.pt").exists()


def test_parameter_groups_and_schedule(features: Path) -> None:
    from heads.base import FeatureSpec
    head = LinearHead(FeatureSpec("image", 4), FeatureSpec("text", 3), embed_dim=5)
    criterion = build_loss("infonce")
    groups = param_groups(RetrievalModel(head), criterion, 1e-3, 1e-4,
                          {"image_fc": 0.1, "image_fc.bias": 2.0, "loss": 0.5})
    by_name = {n: (g["lr"], g["weight_decay"]) for g in groups for n in g["names"]}
    assert by_name["image_fc.weight"] == (pytest.approx(1e-4), 1e-4)
    assert by_name["image_fc.bias"] == (pytest.approx(2e-3), 1e-4)        # longest prefix wins
    assert by_name["text_fc.weight"] == (1e-3, 1e-4)
    assert by_name["loss.log_scale"] == (pytest.approx(5e-4), 0.0)         # no decay on the loss
    with pytest.raises(InputError, match="image_f"):
        param_groups(RetrievalModel(head), criterion, 1e-3, 0.0, {"image_f": 0.1})  # a module
    assert [lr_factor(s, 10, [2, 3], 0.1, 0) for s in (0, 19, 20, 29, 30)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01])
    assert [lr_factor(s, 10, [], 0.1, 4) for s in (0, 1, 3, 9)] == pytest.approx([0.25, 0.5, 1, 1])
