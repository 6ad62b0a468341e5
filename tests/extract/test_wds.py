"""WebDataset shards: brace patterns, img2dataset-style samples (.jpg + .txt or .json captions),
``cli extract --dataset wds`` giving the caches a CSV of the same photos gives, rank sharding and
merge, resume after a kill, and a truncated shard named with its member (resume goes on once the
shard is fixed)."""
from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from cache.errors import InputError
from cache.store import ImageCacheWriter, TextCache, open_cache, partial_path
from extract.datasets import load_rgb
from extract.demo_data import write_example_csv
from extract.formats import DatasetRequest, dataset_format
from extract.wds import expand_braces, scan_shard, write_shards
from tests.extract.cli_helpers import run_cli, save_tiny_models

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SPLITS = ("train", "dev", "test")
MODALITIES = ("image-dinov2", "text-bert")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """The example CSV (40 photos), tiny models, its caches, and its splits as shards of 8."""
    root = tmp_path_factory.mktemp("wds")
    csv = write_example_csv(root / "example", num_images=40, side=32, seed=0)
    words = csv.read_text().replace(",", " ").replace(":", " ").split()
    models = save_tiny_models(root / "models", words)
    indexes = dataset_format("csv").load("csv", DatasetRequest(
        (str(csv),), list(SPLITS), str(root / "example" / "photos"))).indexes
    patterns = {split: write_shards(index, root / "shards" / split, per_shard=8)
                for split, index in indexes.items()}
    code, output = run_cli(*args(models, "csv", [csv], root / "csv_out", "--images",
                                 root / "example" / "photos", "--name", "mine"))
    assert code == 0, output
    return {"root": root, "csv_out": root / "csv_out", **models,
            **{f"shards_{s}": Path(p) for s, p in patterns.items()}}


def args(world_or_models: dict[str, Path], fmt: str, data: list[object], out: Path,
         *extra: object) -> list[object]:
    paths = [part for item in data for part in ("--data-path", item)]
    return ["extract", "--backbone", "dinov2", "--weights", world_or_models["dinov2"],
            "--resolution", 32, "--text-encoder", "bert", "--text-weights",
            world_or_models["bert"], "--dataset", fmt, *paths, "--out", out, "--device", "cpu",
            "--workers", 0, "--batch-size", 4, *extra]


def labelled(world: dict[str, Path]) -> list[str]:
    return [f"{split}={world[f'shards_{split}']}" for split in SPLITS]


def wds_args(world: dict[str, Path], out: Path, *extra: object) -> list[object]:
    return args(world, "wds", labelled(world), out, "--name", "mine", *extra)


def assert_same_caches(out: Path, reference: Path, splits=SPLITS) -> None:
    for split in splits:
        for modality in MODALITIES:
            got = open_cache(out / "mine" / split / f"{modality}.h5")
            expected = open_cache(reference / "mine" / split / f"{modality}.h5")
            np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(expected.tokens))
            if modality.startswith("text"):
                assert got.captions == expected.captions
                np.testing.assert_array_equal(got.image_index, expected.image_index)


def test_brace_patterns_expand_like_webdataset():
    assert expand_braces("s/{000..002}.tar") == ["s/000.tar", "s/001.tar", "s/002.tar"]
    assert expand_braces("{a,b}-{8..10}") == ["a-8", "a-9", "a-10", "b-8", "b-9", "b-10"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(InputError, match="runs backwards"):
        expand_braces("{5..1}.tar")


def test_shards_give_the_caches_of_the_same_photos_as_csv(world, tmp_path):
    code, output = run_cli(*wds_args(world, tmp_path))
    assert code == 0, output
    assert_same_caches(tmp_path, world["csv_out"])
    images = open_cache(tmp_path / "mine" / "test" / "image-dinov2.h5")
    assert images.paths[0] == "test/000000.tar/000000000.jpg"
    photo = Path(images.attrs.extra["images_root"]) / images.paths[0]
    csv_images = open_cache(world["csv_out"] / "mine" / "test" / "image-dinov2.h5")
    original = Path(csv_images.attrs.extra["images_root"]) / csv_images.paths[0]
    assert np.array_equal(np.asarray(load_rgb(photo)), np.asarray(load_rgb(original)))


def test_one_pattern_for_all_splits_and_txt_captions(world, tmp_path):
    """img2dataset style: .jpg + .txt (one caption) or .json; split by the hash of the path."""
    photos = world["root"] / "example" / "photos"
    shard = tmp_path / "shards" / "000000.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tar:
        for i, name in enumerate(sorted(p.name for p in photos.iterdir())[:12]):
            tar.add(photos / name, arcname=f"{i:05d}.jpg")
            text = (f"caption {i}" if i % 2 else json.dumps({"caption": f"caption {i}",
                                                             "url": "x"}))
            info = tarfile.TarInfo(f"{i:05d}.{'txt' if i % 2 else 'json'}")
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))
    samples = scan_shard(shard)
    assert [s.captions for s in samples[:2]] == [["caption 0"], ["caption 1"]]
    code, output = run_cli(*args(world, "wds", [tmp_path / "shards" / "{000000..000000}.tar"],
                                 tmp_path / "out", "--split", "train,test", "--split-ratio",
                                 "0.5,0,0.5"))
    assert code == 0, output
    sizes = [len(TextCache(tmp_path / "out" / "shards" / s / "text-bert.h5")) for s in
             ("train", "test")]
    assert sum(sizes) == 12 and min(sizes) > 0


def test_ranks_then_merge_equal_a_single_run(world, tmp_path):
    for rank in (0, 1):
        code, output = run_cli(*wds_args(world, tmp_path, "--split", "train", "--rank", rank,
                                         "--world-size", 2))
        assert code == 0, output
    code, output = run_cli(*wds_args(world, tmp_path, "--split", "train", "--merge"))
    assert code == 0 and output.count("merged") == 2, output
    assert_same_caches(tmp_path, world["csv_out"], ["train"])


class Killed(BaseException):
    """Stands for SIGKILL in-process."""


def test_a_truncated_shard_is_named_and_resume_goes_on_once_it_is_fixed(world, tmp_path,
                                                                       monkeypatch):
    shards = Path(shutil.copytree(world["shards_train"].parent, tmp_path / "shards"))
    data = [f"train={shards / world['shards_train'].name}"]
    run = args(world, "wds", data, tmp_path / "out", "--name", "mine", "--split", "train")
    calls = []

    def append(self, *a, _append=ImageCacheWriter.append, **kw):
        _append(self, *a, **kw)
        calls.append(1)
        if len(calls) == 2:
            raise Killed()
    with monkeypatch.context() as patch:
        patch.setattr(ImageCacheWriter, "append", append)
        with pytest.raises(Killed):
            run_cli(*run)
    target = tmp_path / "out" / "mine" / "train" / "image-dinov2.h5"
    assert partial_path(target).exists()

    good = (shards / "000002.tar").read_bytes()
    with tarfile.open(shards / "000002.tar") as tar:
        member = tar.getmembers()[4]
    (shards / "000002.tar").write_bytes(good[:member.offset_data + 100])
    code, message = run_cli(*run)
    assert code == 2, message
    assert message.startswith(f"{shards / '000002.tar'}: truncated inside member "
                              f"{member.name!r} (100 of {member.size} bytes)"), message
    assert partial_path(target).exists() and not target.exists()

    (shards / "000002.tar").write_bytes(good)
    code, output = run_cli(*run)
    assert code == 0 and f"resumed {target}" in output, output
    assert_same_caches(tmp_path / "out", world["csv_out"], ["train"])


def test_bad_samples_name_shard_and_key(world, tmp_path):
    shard = tmp_path / "000000.tar"
    photo = next((world["root"] / "example" / "photos").iterdir())
    with tarfile.open(shard, "w") as tar:
        tar.add(photo, arcname="a.jpg")
        info = tarfile.TarInfo("b.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"cat"))
        tar.add(photo, arcname="c.jpg")
    with pytest.raises(InputError, match=r"000000\.tar: sample 'a' has no caption \(a \.txt or "
                                         r"\.json member; members: jpg\)"):
        scan_shard(shard)
    with tarfile.open(shard, "w") as tar:
        tar.add(photo, arcname="a.jpg")
        for name, text in (("a.txt", b"a cat"), ("b.txt", b"no photo")):
            info = tarfile.TarInfo(name)
            info.size = len(text)
            tar.addfile(info, io.BytesIO(text))
    request = DatasetRequest((str(shard),), ["train"], table=_skip(False))
    with pytest.raises(InputError, match=r"000000\.tar: sample 'b' has no photo member"):
        dataset_format("wds").load("wds", request)
    request = DatasetRequest((str(shard),), ["train"], table=_skip(True, (1.0, 0.0, 0.0)))
    loaded = dataset_format("wds").load("wds", request)
    assert loaded.skipped == [f"{shard}: b"] and loaded.indexes["train"].captions == ["a cat"]
    code, message = run_cli(*args(world, "wds", [tmp_path / "{000000..000001}.tar"], tmp_path))
    assert code == 2 and message.startswith("--data-path") and "000001.tar not found" in message


def _skip(skip: bool, ratio=None):
    from extract.captioned import TableOptions
    return TableOptions(skip_missing=skip, split_ratio=ratio)
