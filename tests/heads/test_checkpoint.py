"""Warm starts: another run's weights, renamed by prefix, initialise a head; checkpoints written
before token sources existed (format 1) still evaluate and resume."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from cache.errors import InputError
from cache.store import ImageCache, TextCache
from heads.base import FeatureSpec
from heads.checkpoint import FORMAT_VERSION, load_checkpoint, note_centre_view
from heads.model import create_model
from heads.models.linear import LinearHead
from heads.sources import CachedTokens
from train.config import load_config
from train.evaluate import evaluate
from train.trainer import train
from train.warm_start import warm_start
from tests.heads.synthetic_caches import IMAGE_TAG, TEXT_TAG, config_overrides, write_dataset

IMAGE = FeatureSpec("image", 12, prefix_tokens=1)
TEXT = FeatureSpec("text", 8, prefix_tokens=1, suffix_tokens=1)


def _source(embed_dim: int = 16) -> dict:
    """A checkpoint-like state of a head whose projections are called ``vision`` and ``words``."""
    generator = torch.Generator().manual_seed(0)
    model = {"vision.weight": torch.randn(embed_dim, 12, generator=generator),
             "vision.bias": torch.randn(embed_dim, generator=generator),
             "words.weight": torch.randn(embed_dim, 8, generator=generator),
             "words.bias": torch.randn(embed_dim, generator=generator),
             "extra.scale": torch.ones(1)}
    return {"model": model, "head_name": "other", "path": "other/best.pt"}


def test_renamed_weights_initialise_the_head() -> None:
    head = LinearHead(IMAGE, TEXT, embed_dim=16)
    source = _source()
    loaded = warm_start(head, source, {"vision": "image_fc", "words": "text_fc"})
    assert loaded == ["image_fc.bias", "image_fc.weight", "text_fc.bias", "text_fc.weight"]
    assert torch.equal(head.image_fc.weight, source["model"]["vision.weight"])
    assert torch.equal(head.text_fc.bias, source["model"]["words.bias"])


def test_only_the_matching_weights_load() -> None:
    head = LinearHead(IMAGE, TEXT, embed_dim=16)
    text_before = head.text_fc.weight.detach().clone()
    assert warm_start(head, _source(), {"vision": "image_fc"}) == ["image_fc.bias",
                                                                    "image_fc.weight"]
    assert torch.equal(head.text_fc.weight, text_before)


def test_bad_warm_starts_are_named() -> None:
    head = LinearHead(IMAGE, TEXT, embed_dim=16)
    with pytest.raises(InputError, match=r"other/best\.pt.*'vision\.weight'.*\(32, 12\).*image_fc"):
        warm_start(head, _source(embed_dim=32), {"vision": "image_fc"})
    with pytest.raises(InputError, match=r"init\.rename names 'image'"):
        warm_start(head, _source(), {"image": "image_fc"})
    with pytest.raises(InputError, match="no weight .* matches.*init.rename"):
        warm_start(head, _source(), {})


def _as_format_1(path: Path, target: Path) -> None:
    """Rewrite a checkpoint of a cache-only run as this tool wrote it before token sources."""
    state = torch.load(path, weights_only=True)
    del state["sources"]
    for key in ("image_source", "text_source"):
        del state["config"]["data"][key]
    target.mkdir(parents=True, exist_ok=True)
    torch.save({**state, "format": 1}, target / path.name)


def test_a_format_1_checkpoint_still_evaluates_and_resumes(tmp_path: Path) -> None:
    features = write_dataset(tmp_path / "features", train=40, dev=20, test=20)
    config = load_config(None, config_overrides(features, epochs=1, batch_size=40, lr=0.01)
                         + ["loss.name=infonce", "head.embed_dim=16"])
    train(config, tmp_path / "new", show_progress=False)
    for name in ("best.pt", "last.pt"):
        _as_format_1(tmp_path / "new" / name, tmp_path / "old")
    shutil.copy(tmp_path / "new" / "log.jsonl", tmp_path / "old")
    old, new = load_checkpoint(tmp_path / "old" / "best.pt"), load_checkpoint(tmp_path / "new" /
                                                                              "best.pt")
    assert old["format"] == 1 and "sources" not in old and new["format"] == FORMAT_VERSION == 2
    test = [ImageCache(features / "syn" / "test" / f"image-{IMAGE_TAG}.h5"),
            TextCache(features / "syn" / "test" / f"text-{TEXT_TAG}.h5")]
    model = create_model(old, *test)
    assert isinstance(model.image_source, CachedTokens) and model.tuned_states() == {}
    assert (evaluate(model, *test)["metrics"]
            == evaluate(create_model(new, *test), *test)["metrics"])
    resumed = []
    for run in ("old", "new"):
        config = load_config(None, ["optim.epochs=2"],
                             base=load_checkpoint(tmp_path / run / "last.pt")["config"])
        history = train(config, tmp_path / run, resume=True, show_progress=False).history
        resumed.append([(h["epoch"], h["loss"], h["dev"]) for h in history])
    assert resumed[0] == resumed[1] and resumed[0][0][0] == 1


def test_readers_of_one_view_say_the_run_trained_on_several(capsys) -> None:
    """``cli index`` / ``cli explain`` encode one view per photo: the centre view."""
    note_centre_view({"path": "run/best.pt", "image_views": 4}, "cli index")
    assert capsys.readouterr().err == (
        "note: run/best.pt was trained on 4 views per photo; cli index encodes each photo once, "
        "as the centre view (the extraction's preprocessing)\n")
    note_centre_view({"path": "run/best.pt", "image_views": 1}, "cli explain")
    note_centre_view({"path": "old/best.pt"}, "cli explain")      # written before views
    assert capsys.readouterr().err == ""
