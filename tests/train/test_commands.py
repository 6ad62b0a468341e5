"""``cli train-head`` and ``cli eval`` end to end, and their one-line error paths (exit 2)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import cli
from heads.checkpoint import load_checkpoint
from heads.models.linear import LinearHead
from tests.heads.synthetic_caches import config_overrides, write_dataset, write_split

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
            *args: str) -> tuple[int, str, str]:
    """Run ``cli.main`` (the console-script entry point) with ``args``: (exit code, out, err)."""
    monkeypatch.setattr(sys, "argv", ["cli", *args])
    try:
        cli.main()
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def features(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("features"), train=40, dev=20, test=20)


def _sets(features: Path, head: str | None = "linear", **optim: object) -> list[str]:
    """``--set`` options for the synthetic caches (and a small linear head when ``head``)."""
    optim = {"epochs": 1, "batch_size": 40, "lr": 0.01, **optim}
    items = config_overrides(features, head, **optim) + ["loss.name=infonce"]
    items += ["head.embed_dim=32"] if head == "linear" else []
    return [part for item in items for part in ("--set", item)]


@pytest.fixture(scope="module")
def config_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("configs") / "syn_linear.yaml"
    path.write_text("head:\n  name: linear\ndata:\n  image: synimg\n  text: syntxt\n")
    return path


def test_train_then_eval(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                         features: Path, config_file: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    code, out, err = run_cli(monkeypatch, capsys, "train-head", "--config", str(config_file),
                             "--out", str(run), "--no-progress", *_sets(features))
    assert code == 0, err
    assert "best dev rsum" in out and (run / "best.pt").exists()
    code, out, err = run_cli(monkeypatch, capsys, "eval", "--checkpoint", str(run / "best.pt"),
                             "--split", "test", "--device", "cpu",
                             "--save-sims", str(tmp_path / "sims.npz"))
    assert code == 0, err
    for needle in ("image->text", "text->image", "R@1", "medr", "rsum", "seconds"):
        assert needle in out
    report = json.loads((run / "eval-test.json").read_text())
    assert report["split"] == "test" and report["images"] == 20 and report["captions"] == 100
    assert 0 <= report["metrics"]["rsum"] <= 600
    assert (tmp_path / "sims.npz").exists()
    code, out, err = run_cli(monkeypatch, capsys, "eval", "--checkpoint", str(run / "best.pt"),
                             "--split", "test", "--device", "cpu", "--max-images", "8",
                             "--json", str(tmp_path / "first8.json"))
    assert code == 0, err
    first8 = json.loads((tmp_path / "first8.json").read_text())
    assert first8["pairs_scored"] == 8 * 40 and first8["metrics"] != report["metrics"]

    # resume with one more epoch: the saved config is used, --set changes the epoch count
    code, out, err = run_cli(monkeypatch, capsys, "train-head", "--out", str(run), "--resume",
                             "--set", "optim.epochs=2", "--no-progress")
    assert code == 0, err
    assert load_checkpoint(run / "last.pt")["epoch"] == 1
    code, _, err = run_cli(monkeypatch, capsys, "train-head", "--config", str(config_file),
                           "--out", str(run), "--resume", "--set", "optim.epochs=3",
                           "--no-progress")
    assert code == 2 and str(config_file) in err    # the bare file differs from the run's config
    code, _, err = run_cli(monkeypatch, capsys, "train-head", "--out", str(run), "--resume",
                           "--set", "optim.epochs=3", "--set", "head.embed_dim=8")
    _one_line_error(code, err, "last.pt", "does not fit")


def _one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], err


def test_error_paths(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                     features: Path, config_file: Path, tmp_path: Path) -> None:
    code, _, err = run_cli(monkeypatch, capsys, "eval", "--checkpoint", str(tmp_path / "no.pt"))
    _one_line_error(code, err, "no.pt", "not found")

    code, _, err = run_cli(monkeypatch, capsys, "train-head", "--config", str(config_file),
                           "--out", str(tmp_path / "r1"), "--set", "optim.lrr=1")
    _one_line_error(code, err, "optim.lrr", str(config_file))

    missing = tmp_path / "nothing"
    code, _, err = run_cli(monkeypatch, capsys, "train-head", "--config", str(config_file),
                           "--out", str(tmp_path / "r2"), *_sets(missing))
    _one_line_error(code, err, "image-synimg.h5", "not found")

    with monkeypatch.context() as patch:        # a head that needs a patch grid, on region tokens
        patch.setattr(LinearHead, "requires_grid", True)
        code, _, err = run_cli(monkeypatch, capsys, "train-head", "--config", str(config_file),
                               "--head", "linear", "--out", str(tmp_path / "r3"),
                               *_sets(features, head=None))
    _one_line_error(code, err, "image-synimg.h5", "grid")

    code, _, err = run_cli(monkeypatch, capsys, "train-head", "--config", str(config_file),
                           "--head", "no_such_head", "--out", str(tmp_path / "r3"))
    _one_line_error(code, err, "no_such_head", "available")

    code, _, err = run_cli(monkeypatch, capsys, "train-head", "--out", str(tmp_path / "r4"))
    _one_line_error(code, err, "--config")

    code, _, err = run_cli(monkeypatch, capsys, "train-head", "--config", str(config_file),
                           "--out", str(tmp_path / "r5"), "--device", "tpu7", *_sets(features))
    _one_line_error(code, err, "tpu7")

    # a trained head against caches of another encoder / a missing cache file
    run = tmp_path / "run"
    assert run_cli(monkeypatch, capsys, "train-head", "--config", str(config_file), "--out",
                   str(run), "--no-progress", *_sets(features))[0] == 0
    other = tmp_path / "other"
    image_path, text_path = write_split(other, "test", 10, encoder="another")
    code, _, err = run_cli(monkeypatch, capsys, "eval", "--checkpoint", str(run / "best.pt"),
                           "--image-cache", str(image_path), "--text-cache", str(text_path))
    _one_line_error(code, err, str(image_path), "encoder")
    code, _, err = run_cli(monkeypatch, capsys, "eval", "--checkpoint", str(run / "best.pt"),
                           "--split", "val")
    _one_line_error(code, err, "val/image-synimg.h5", "not found")
    not_a_checkpoint = tmp_path / "bad.pt"
    not_a_checkpoint.write_text("hello")
    code, _, err = run_cli(monkeypatch, capsys, "eval", "--checkpoint", str(not_a_checkpoint))
    _one_line_error(code, err, "bad.pt", "checkpoint")


def test_train_head_without_a_config_file(monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str], features: Path,
                                          tmp_path: Path) -> None:
    """``--head NAME --features DIR --dataset NAME``: the reference recipe, the head's defaults
    and the only image/text caches of the train split, saved as the resolved config."""
    run = tmp_path / "run"
    small = ["--set", "optim.epochs=1", "--set", "optim.batch_size=40", "--set", "run.device=cpu",
             "--set", "data.preload=none", "--set", "run.tensorboard=false"]
    code, out, err = run_cli(monkeypatch, capsys, "train-head", "--head", "linear", "--features",
                             str(features), "--dataset", "syn", "--out", str(run),
                             "--no-progress", *small)
    assert code == 0, err
    config = load_checkpoint(run / "best.pt")["config"]
    assert config["data"]["image"] == "synimg" and config["data"]["text"] == "syntxt"
    assert config["loss"]["name"] == "hinge" and config["optim"]["lr"] == 5.0e-4   # reference
    assert config["head"] == {"name": "linear", **{k: v for k, v in config["head"].items()
                                                  if k != "name"}}
    assert config["head"]["embed_dim"] == LinearHead.__init__.__defaults__[0]
    assert "linear" in (run / "config.yaml").read_text()


def test_train_head_without_a_config_file_names_what_is_missing(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], features: Path,
        tmp_path: Path) -> None:
    code, _, err = run_cli(monkeypatch, capsys, "train-head", "--head", "linear", "--out",
                           str(tmp_path / "r"))
    assert code == 2 and "--head NAME --features DIR --dataset NAME" in err
    (features / "syn" / "train" / "image-other.h5").write_bytes(b"")
    try:
        code, _, err = run_cli(monkeypatch, capsys, "train-head", "--head", "linear",
                               "--features", str(features), "--dataset", "syn", "--out",
                               str(tmp_path / "r"))
    finally:
        (features / "syn" / "train" / "image-other.h5").unlink()
    assert code == 2 and "found other, synimg; choose with --set data.image=TAG" in err
