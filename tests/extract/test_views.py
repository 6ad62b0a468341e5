"""``cli extract --views N``: the training split's image caches with N views per photo.

Tiny random DINOv2/BERT models on rendered demo scenes: what the views cache holds (the centre view
where one-view readers read it, the augmented views as a direct forward of the seeded draws), that a
rerun with other decoding workers, a run killed and resumed, and sharded runs merged all give the
same file, what ``cli info`` says, and the one-line exit-2 errors of bad input.
"""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from backbones.registry import create_image_encoder
from cache.errors import InputError
from cache.store import ImageCache, ImageCacheWriter, open_cache, partial_path
from extract.datasets import load_rgb, load_split
from extract.views import ViewTransform, Views, view_seed
from tests.extract.cli_helpers import run_cli
from tests.extract.test_runner import Killed, demo, tiny, tiny_args  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VIEWS = ("--split", "train,dev,test", "--limit", 6, "--batch-size", 4, "--views", 3,
         "--tag", "v3", "--text-tag", "t")


def views_files(out: Path) -> dict[str, Path]:
    return {split: out / "f30k" / split / "image-v3.h5" for split in ("train", "dev", "test")}


@pytest.fixture(scope="module")
def views_run(demo, tiny, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("views")
    code, output = run_cli(*tiny_args(demo, out, tiny, *VIEWS))
    assert code == 0, output
    return out, output


def test_train_gets_views_and_the_other_splits_the_centre_view(demo, tiny, views_run, tmp_path):
    out, output = views_run
    caches = {split: ImageCache(path) for split, path in views_files(out).items()}
    train = caches["train"]
    assert train.num_views == 3 and train.attrs.views == 3
    assert train.attrs.augmentation["crop_scale"] == [0.6, 1.0]
    assert train.attrs.augmentation["seed"] == 0
    assert train.view_tokens.shape == (6, 2, *train.tokens.shape[1:])
    for split in ("dev", "test"):
        assert caches[split].num_views == 1 and caches[split].attrs.augmentation == {}
        with h5py.File(caches[split].path) as f:
            assert "view_tokens" not in f
    assert ("views: train holds 3 per photo (view 0 the centre view, 1..2 augmented: crop scale "
            "0.6-1 + flip, seed 0); dev, test hold the centre view only") in output
    # the centre view is what a one-view extraction writes
    code, single = run_cli(*tiny_args(demo, tmp_path, tiny, "--split", "train", "--limit", 6,
                                      "--batch-size", 4))
    assert code == 0, single
    one = ImageCache(tmp_path / "f30k" / "train" / "image-dinov2.h5")
    np.testing.assert_array_equal(np.asarray(train.tokens), np.asarray(one.tokens))
    # views 1..2: the encoder on the seeded draws of the training augmentation
    encoder = create_image_encoder("dinov2", str(tiny["dinov2"]), resolution=32)
    index = load_split("f30k", demo, "train", demo / "images")
    transform = ViewTransform(encoder.transform, Views(3))
    row = 4
    pixels = transform(load_rgb(index.image_file(row)), row)
    with torch.no_grad():
        expected = encoder(pixels).numpy()
    np.testing.assert_allclose(train.view_tokens[row].astype(np.float32), expected[1:],
                               atol=2e-3, rtol=1e-2)    # the cache stores fp16
    assert not np.array_equal(train.view_tokens[row, 0], train.view_tokens[row, 1])
    assert not np.array_equal(train.view_tokens[row, 0], train.tokens[row])
    tokens, _ = train.read_views([row, row, 2], [0, 2, 1])
    np.testing.assert_array_equal(tokens, np.stack([train.tokens[row], train.view_tokens[row, 1],
                                                    train.view_tokens[2, 0]]))


def test_views_are_seeded_per_seed_row_and_view():
    assert view_seed(0, 4, 1) == view_seed(0, 4, 1)
    assert len({view_seed(0, 4, 1), view_seed(0, 4, 2), view_seed(0, 5, 1),
                view_seed(1, 4, 1)}) == 4


def test_a_rerun_with_other_workers_is_bit_identical(demo, tiny, views_run, tmp_path):
    out, _ = views_run
    code, output = run_cli(*tiny_args(demo, tmp_path, tiny, *VIEWS)[:-2], "--workers", 2)
    assert code == 0, output
    for split, path in views_files(tmp_path).items():
        got, expected = ImageCache(path), ImageCache(views_files(out)[split])
        assert got.attrs == expected.attrs
        np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(expected.tokens))
        if split == "train":
            np.testing.assert_array_equal(np.asarray(got.view_tokens),
                                          np.asarray(expected.view_tokens))


def test_a_killed_views_run_resumes_to_the_same_file(demo, tiny, views_run, tmp_path,
                                                     monkeypatch):
    out, _ = views_run
    args = tiny_args(demo, tmp_path, tiny, *VIEWS)
    with monkeypatch.context() as patch:
        def append(self, *a, _append=ImageCacheWriter.append, **kw):
            _append(self, *a, **kw)
            raise Killed(self.path)                   # right after the first committed batch
        patch.setattr(ImageCacheWriter, "append", append)
        with pytest.raises(Killed):
            run_cli(*args)
    train = views_files(tmp_path)["train"]
    assert partial_path(train).exists() and not train.exists()
    code, output = run_cli(*args)
    assert code == 0, output
    assert f"resumed {train} (" in output
    got, expected = ImageCache(train), ImageCache(views_files(out)["train"])
    assert got.attrs == expected.attrs
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(expected.tokens))
    np.testing.assert_array_equal(np.asarray(got.view_tokens), np.asarray(expected.view_tokens))
    code, output = run_cli(*args)
    assert code == 0 and f"kept {train} (" in output


def test_shards_of_a_views_run_merge_into_the_same_file(demo, tiny, views_run, tmp_path):
    out, _ = views_run
    args = tiny_args(demo, tmp_path, tiny, *VIEWS)
    for rank in (0, 1):
        code, output = run_cli(*args, "--rank", rank, "--world-size", 2)
        assert code == 0, output
    code, output = run_cli(*args, "--merge")
    assert code == 0, output
    got, expected = ImageCache(views_files(tmp_path)["train"]), ImageCache(views_files(out)["train"])
    assert got.attrs == expected.attrs
    np.testing.assert_array_equal(np.asarray(got.view_tokens), np.asarray(expected.view_tokens))


def test_info_says_how_many_views(views_run):
    out, _ = views_run
    code, output = run_cli("info", views_files(out)["train"], views_files(out)["dev"])
    assert code == 0, output
    assert ("  views: 3 views per photo: view 0 the centre view, views 1..2 augmented "
            "(RandomResizedCrop + RandomHorizontalFlip") in output
    assert "  views: 1 view per photo (the centre view)" in output


def test_an_old_one_view_cache_reads_as_one_view(views_run, tmp_path):
    """A cache written before views existed (no views / augmentation attributes) is a cache of one
    view, of the same identity as a one-view cache written now."""
    out, _ = views_run
    dev = tmp_path / "dev.h5"
    dev.write_bytes(views_files(out)["dev"].read_bytes())
    with h5py.File(dev, "r+") as f:
        del f.attrs["views"], f.attrs["augmentation"]
    old, new = ImageCache(dev), ImageCache(views_files(out)["dev"])
    assert old.num_views == 1 and old.attrs == new.attrs
    tokens, _ = old.read_views([0, 1], [0, 0])
    np.testing.assert_array_equal(tokens, old.read([0, 1])[0])
    with pytest.raises(InputError, match="one view per photo"):
        old.view_tokens


@pytest.mark.parametrize("extra, message", [
    (("--views", 0), "--views must be >= 1, got 0"),
    (("--views", 3, "--split", "dev,test"),
     "--views 3: only the training split ('train') gets views, and --split names dev, test"),
    (("--views", 3, "--crop-scale", "0.9,0.5"), "--crop-scale 0.9,0.5: must be LOW,HIGH"),
    (("--views", 3, "--crop-scale", "big"), "--crop-scale 'big': give LOW,HIGH"),
])
def test_bad_views_stop_before_any_file(demo, tiny, tmp_path, extra, message):
    code, output = run_cli(*tiny_args(demo, tmp_path, tiny, "--limit", 6), *extra)
    assert code == 2 and message in output
    assert not (tmp_path / "f30k").exists()


def test_views_on_a_text_only_call_is_an_error(demo, tiny, tmp_path):
    code, output = run_cli("extract", "--text-encoder", "bert", "--text-weights", tiny["bert"],
                           "--dataset", "f30k", "--data-path", demo, "--out", tmp_path,
                           "--split", "train", "--views", 4)
    assert code == 2
    assert "--views 4: views are augmented photos, and this call extracts no image encoder" in output
    assert not (tmp_path / "f30k").exists()


def test_a_one_view_train_file_under_the_same_tag_is_named(demo, tiny, views_run, tmp_path):
    """Views are part of a cache's identity: a one-view file in the way stops a views call (and
    the other way round) before any work."""
    args = tiny_args(demo, tmp_path, tiny, "--split", "train", "--limit", 6, "--tag", "v3")
    code, output = run_cli(*args)
    assert code == 0, output
    code, output = run_cli(*args, "--views", 3)
    assert code == 2
    assert "a complete cache from a different extraction exists" in output
    assert "views: 1 != 3" in output
    assert open_cache(tmp_path / "f30k" / "train" / "image-v3.h5").attrs.views == 1
