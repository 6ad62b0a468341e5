"""``cli extract`` end to end on CPU: what it writes, resume after SIGKILL, reruns after a kill at
any file of a multi-file call, the merged summary, shards + merge, and the one-line exit-2 errors
for every kind of bad input.

Tiny random DINOv2/BERT models (saved to a temp folder, loaded through the hub-id code path) keep
most tests fast; the resume test and the Flickr8k test run the real EfficientNet-Lite0 / MiniLM.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from backbones.registry import create_image_encoder, create_text_encoder
from cache.errors import InputError
from cache.store import (ImageCache, ImageCacheWriter, TextCache, TextCacheWriter, describe,
                         open_cache, partial_path)
from extract.datasets import load_split
from extract.demo_data import generate_demo_data
from extract.runner import RunOptions, extract_image_layers, limit_split
from tests.extract.cli_helpers import CLI_PY, REPO_ROOT, run_cli, save_tiny_models


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """60 rendered 48-px scenes (train 50 / dev 5 / test 5) in the Flickr30K layout."""
    root = tmp_path_factory.mktemp("demo")
    generate_demo_data(root, num_images=60, side=48, seed=3)
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, demo) -> dict[str, Path]:
    words = (demo / "train_caps.txt").read_text().replace(",", " ").replace(":", " ").split()
    return save_tiny_models(tmp_path_factory.mktemp("tiny"), words)


def copy_demo(demo: Path, tmp_path: Path) -> Path:
    target = tmp_path / "data"
    shutil.copytree(demo, target)
    return target


def tiny_args(data: Path, out: Path, tiny: dict[str, Path], *extra: object) -> list[object]:
    return ["extract", "--backbone", "dinov2", "--weights", tiny["dinov2"], "--resolution", 32,
            "--text-encoder", "bert", "--text-weights", tiny["bert"], "--dataset", "f30k",
            "--data-path", data, "--images", data / "images", "--out", out, "--device", "cpu",
            "--workers", 0, *extra]


def files(out: Path, split: str = "train") -> tuple[Path, Path]:
    return (out / "f30k" / split / "image-dinov2.h5", out / "f30k" / split / "text-bert.h5")


# ------------------------------------------------------------------------------------------ output


def test_extract_records_the_photo_folder_absolute_and_where_it_ran(demo, tiny, tmp_path,
                                                                    monkeypatch):
    """``--images`` given relative is recorded absolute, so e2e runs and ``cli eval`` started
    elsewhere find the photos; the directory the extraction ran in is recorded beside it."""
    copy_demo(demo, tmp_path)
    monkeypatch.chdir(tmp_path)
    code, output = run_cli(*tiny_args(Path("data"), Path("out"), tiny, "--split", "test",
                                      "--limit", 2))
    assert code == 0, output
    extra = ImageCache(files(tmp_path / "out", "test")[0]).attrs.extra
    assert extra == {"images_root": str((tmp_path / "data" / "images").resolve()),
                     "extraction_cwd": str(tmp_path.resolve())}


def test_extract_writes_caches_equal_to_a_direct_forward(demo, tiny, tmp_path):
    code, output = run_cli(*tiny_args(demo, tmp_path, tiny, "--split", "train,test", "--limit", 12,
                                      "--batch-size", 5))
    assert code == 0, output
    assert "items/s" in output and "image-dinov2.h5" in output
    image_file, text_file = files(tmp_path)
    images, texts = ImageCache(image_file), TextCache(text_file)
    index = load_split("f30k", demo, "train", demo / "images")

    assert len(images) == 12 and images.ids == index.image_ids[:12]
    assert images.paths == index.image_paths[:12]
    a = images.attrs
    assert (a.encoder, a.num_tokens, a.prefix_tokens, a.grid, a.dim) == ("dinov2", 17, 1, (4, 4), 16)
    assert a.weights_id == str(tiny["dinov2"].resolve()) and a.split == "train"
    encoder = create_image_encoder("dinov2", str(tiny["dinov2"]), resolution=32)
    pixels = torch.stack([encoder.transform(Image.open(index.image_file(r))) for r in range(12)])
    with torch.inference_mode():
        expected = encoder(pixels).to(torch.float16).numpy()
    got, lengths = images.read(np.arange(12))
    np.testing.assert_allclose(got.astype(np.float32), expected.astype(np.float32), atol=2e-3)
    assert (lengths == 17).all()

    assert len(texts) == 60 and texts.captions == index.captions[:60]
    np.testing.assert_array_equal(texts.image_index, index.caption_image_index[:60])
    assert texts.attrs.prefix_tokens == 1 and texts.attrs.suffix_tokens == 1
    text_encoder = create_text_encoder("bert", str(tiny["bert"]))
    cls, sep = text_encoder.tokenizer.cls_token_id, text_encoder.tokenizer.sep_token_id
    for row in (0, 37):
        ids = texts.input_ids(row)
        assert ids[0] == cls and ids[-1] == sep
        with torch.inference_mode():
            states = text_encoder(*text_encoder.pad_batch([ids.tolist()]))[0]
        cached, length = texts.read([row])
        assert length[0] == len(ids)
        np.testing.assert_allclose(cached[0].astype(np.float32), states.numpy(), atol=2e-3)

    summary = json.loads((tmp_path / "f30k" / "extract-summary.json").read_text())["files"]
    assert list(summary) == ["test/image-dinov2.h5", "test/text-bert.h5", "train/image-dinov2.h5",
                             "train/text-bert.h5"]
    entry = summary["train/image-dinov2.h5"]
    assert entry["rows"] == 12 and entry["status"] == "written"
    assert entry["settings"]["limit"] == 12 and entry["file"] == str(image_file)
    assert len(ImageCache(files(tmp_path, "test")[0])) == 5


def test_decoding_workers_give_the_same_file(demo, tiny, tmp_path):
    args = ["--split", "train", "--limit", 8, "--batch-size", 4]
    assert run_cli(*tiny_args(demo, tmp_path / "a", tiny, *args))[0] == 0
    a = tiny_args(demo, tmp_path / "b", tiny, *args)
    a[a.index("--workers") + 1] = 2
    assert run_cli(*a)[0] == 0
    for x, y in zip(files(tmp_path / "a"), files(tmp_path / "b")):
        np.testing.assert_array_equal(np.asarray(open_cache(x).tokens), np.asarray(open_cache(y).tokens))


def test_text_only_needs_no_images(demo, tiny, tmp_path):
    code, output = run_cli("extract", "--text-encoder", "bert", "--text-weights", tiny["bert"],
                           "--dataset", "f30k", "--data-path", demo, "--split", "dev",
                           "--out", tmp_path, "--device", "cpu", "--text-tag", "tinybert")
    assert code == 0, output
    assert len(TextCache(tmp_path / "f30k" / "dev" / "text-tinybert.h5")) == 25


# ------------------------------------------------------------------------------------------ reruns


def stamps(paths: list[Path]) -> dict[Path, tuple[int, bytes]]:
    """Modification time and bytes of each file: equal stamps = a file left untouched."""
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in paths}


def test_complete_files_of_the_same_work_are_kept_or_replaced(demo, tiny, tmp_path):
    args = tiny_args(demo, tmp_path, tiny, "--split", "dev")
    assert run_cli(*args)[0] == 0
    before = stamps(list(files(tmp_path, "dev")))
    for extra in ((), ("--skip-existing",)):  # --skip-existing: accepted, now the default
        code, output = run_cli(*args, *extra)
        assert code == 0, output
        for path in files(tmp_path, "dev"):
            assert f"kept {path}" in output
        assert stamps(list(files(tmp_path, "dev"))) == before
    code, message = run_cli(*args, "--overwrite", "--skip-existing")
    assert code == 2 and message == "--overwrite and --skip-existing exclude each other"
    code, output = run_cli(*args, "--overwrite")
    assert code == 0 and f"written {files(tmp_path, 'dev')[0]}" in output


def test_complete_file_of_another_backbone_is_named(demo, tiny, tmp_path):
    assert run_cli(*tiny_args(demo, tmp_path, tiny, "--split", "dev", "--tag", "x"))[0] == 0
    other = tiny_args(demo, tmp_path, tiny, "--split", "dev", "--tag", "x", "--skip-existing")
    other[other.index("--weights") + 1] = tiny["dinov2_other"]
    code, message = run_cli(*other)
    assert code == 2
    assert message.startswith(f"{tmp_path / 'f30k' / 'dev' / 'image-x.h5'}: a complete cache from "
                              "a different extraction exists (file != this call: weights_id: ")
    assert "weights_hash" in message and "--overwrite" in message


class Killed(BaseException):
    """Stands for SIGKILL in-process: nothing in the command catches it."""


def kill_in_file(monkeypatch, number: int) -> None:
    """Make the command die right after the first batch of the ``number``-th file it writes
    (0-based): the files before it are complete, that one is a .partial with a batch committed."""
    started: list[Path] = []
    for writer in (ImageCacheWriter, TextCacheWriter):
        def append(self, *args, _append=writer.append, **kwargs):
            _append(self, *args, **kwargs)
            if self.path not in started:
                started.append(self.path)
            if len(started) > number:
                raise Killed(self.path)
        monkeypatch.setattr(writer, "append", append)


ALL_SPLITS = ("--split", "train,dev,test", "--limit", 6, "--batch-size", 4)


def all_files(out: Path) -> list[Path]:
    """The six files of ``ALL_SPLITS`` in the order the command writes them."""
    return [path for split in ("train", "dev", "test") for path in files(out, split)]


@pytest.fixture(scope="module")
def uninterrupted(demo, tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    code, output = run_cli(*tiny_args(demo, out, tiny, *ALL_SPLITS))
    assert code == 0, output
    return out


@pytest.mark.parametrize("killed_in", range(6))
@pytest.mark.parametrize("partial", ["left", "deleted"])
def test_rerun_after_a_kill_in_any_file_finishes_and_keeps_complete_files(
        demo, tiny, uninterrupted, tmp_path, monkeypatch, killed_in, partial):
    """Killed while writing file ``killed_in`` (its .partial left, or deleted: killed exactly at
    the boundary); rerunning the same command keeps the complete files untouched, resumes or
    writes the rest, and every file equals the uninterrupted run's."""
    args = tiny_args(demo, tmp_path, tiny, *ALL_SPLITS)
    with monkeypatch.context() as patch:
        kill_in_file(patch, killed_in)
        with pytest.raises(Killed):
            run_cli(*args)
    paths = all_files(tmp_path)
    assert [p.exists() for p in paths] == [i < killed_in for i in range(6)]
    assert partial_path(paths[killed_in]).exists()
    if partial == "deleted":
        partial_path(paths[killed_in]).unlink()
    complete = stamps(paths[:killed_in])

    code, output = run_cli(*args)
    assert code == 0, output
    assert stamps(paths[:killed_in]) == complete
    for i, path in enumerate(paths):
        status = "kept" if i < killed_in else "written"
        if i == killed_in and partial == "left":
            status = "resumed"
        assert f"{status} {path} (" in output
        assert not partial_path(path).exists()
    for path, reference in zip(paths, all_files(uninterrupted)):
        got, expected = open_cache(path), open_cache(reference)
        assert got.attrs == expected.attrs
        np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(expected.tokens))


# ------------------------------------------------------------------------- several layers, one pass


def layer_args(data: Path, out: Path, tiny: dict[str, Path], layers: str, tag: str) -> list[object]:
    return ["extract", "--backbone", "dinov2", "--weights", tiny["dinov2"], "--resolution", 32,
            "--layer", layers, "--tag", tag, "--dataset", "f30k", "--data-path", data,
            "--images", data / "images", "--out", out, "--device", "cpu", "--workers", 0,
            "--split", "train", "--limit", 12, "--batch-size", 5]


LAYER_FILES = ("image-d_l0.h5", "image-d_l1.h5", "image-d.h5")


@pytest.fixture(scope="module")
def layers_in_one_pass(demo, tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("layers")
    code, output = run_cli(*layer_args(demo, out, tiny, "0,1,-1", "d"))
    assert code == 0, output
    return out


def test_several_layers_in_one_pass_equal_one_call_per_layer(demo, tiny, layers_in_one_pass,
                                                             tmp_path):
    for name, layer in zip(LAYER_FILES, ("0", "1", "-1")):
        code, output = run_cli(*layer_args(demo, tmp_path, tiny, layer, f"one{layer}"))
        assert code == 0, output
        got = open_cache(layers_in_one_pass / "f30k" / "train" / name)
        expected = open_cache(tmp_path / "f30k" / "train" / f"image-one{layer}.h5")
        assert got.attrs == expected.attrs and got.attrs.layer == int(layer)
        np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(expected.tokens))
    summary = json.loads((layers_in_one_pass / "f30k" / "extract-summary.json").read_text())
    assert sorted(summary["files"]) == sorted(f"train/{name}" for name in LAYER_FILES)
    assert summary["files"]["train/image-d.h5"]["settings"]["layer"] == [0, 1, -1]


@pytest.mark.parametrize("appends", [1, 4, 5, 8])
def test_a_pass_killed_between_its_layer_files_resumes_each_file(demo, tiny, layers_in_one_pass,
                                                                 tmp_path, monkeypatch, appends):
    """Killed after ``appends`` batch writes (one per layer file per batch, so the files stop at
    different rows); the rerun resumes each file from its own row and equals the uninterrupted
    pass."""
    args = layer_args(demo, tmp_path, tiny, "0,1,-1", "d")
    written: list[int] = []
    with monkeypatch.context() as patch:
        def append(self, *a, _append=ImageCacheWriter.append, **kw):
            if len(written) == appends:
                raise Killed(self.path)
            _append(self, *a, **kw)
            written.append(1)
        patch.setattr(ImageCacheWriter, "append", append)
        with pytest.raises(Killed):
            run_cli(*args)
    paths = [tmp_path / "f30k" / "train" / name for name in LAYER_FILES]
    assert not any(path.exists() for path in paths)
    code, output = run_cli(*args)
    assert code == 0, output
    for path in paths:
        assert f"resumed {path} (" in output or f"written {path} (" in output
        expected = open_cache(layers_in_one_pass / "f30k" / "train" / path.name)
        got = open_cache(path)
        assert got.attrs == expected.attrs
        np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(expected.tokens))
    code, output = run_cli(*args)
    assert code == 0 and all(f"kept {path} (" in output for path in paths)


@pytest.mark.parametrize("layers, message", [
    ("1,1", "--layer '1,1' names a layer twice"),
    ("one", "--layer 'one': give a layer number or several, comma-separated (6,8,10,-1)"),
    ("0,5", "dinov2: layer must be -1 (final output) or 0..2, got 5"),
])
def test_bad_layer_lists_stop_before_any_file(demo, tiny, tmp_path, layers, message):
    code, output = run_cli(*layer_args(demo, tmp_path, tiny, layers, "d"))
    assert (code, output) == (2, message)
    assert not (tmp_path / "f30k").exists()


def test_one_pass_refuses_layers_of_two_backbones(demo, tiny, tmp_path):
    index = limit_split(load_split("f30k", demo, "train", demo / "images"), 4)
    encoders = [create_image_encoder("dinov2", str(tiny["dinov2"]), layer=1, resolution=32),
                create_image_encoder("dinov2", str(tiny["dinov2_other"]), resolution=32)]
    paths = [tmp_path / "a.h5", tmp_path / "b.h5"]
    with pytest.raises(InputError, match="one pass over several layers needs one backbone: dinov2 "
                                         ".*dinov2_other at 32 px differs from dinov2 .* at 32 px"):
        extract_image_layers(index, encoders, paths, RunOptions(workers=0))
    assert list(tmp_path.iterdir()) == []


def test_a_file_of_other_settings_stops_the_command_before_any_work(demo, tiny, tmp_path):
    first = tiny_args(demo, tmp_path, tiny, "--split", "test", "--limit", 6, "--batch-size", 4)
    assert run_cli(*first)[0] == 0
    test_image, test_text = files(tmp_path, "test")
    before = stamps([test_image, test_text])
    other = tiny_args(demo, tmp_path, tiny, *ALL_SPLITS)  # all splits, other image weights
    other[other.index("--weights") + 1] = tiny["dinov2_other"]
    code, message = run_cli(*other)
    assert code == 2
    assert message.startswith(f"{test_image}: a complete cache from a different extraction exists")
    assert "weights_id" in message and "weights_hash" in message and "--overwrite" in message
    assert not (tmp_path / "f30k" / "train").exists()  # nothing done before the refusal
    assert stamps([test_image, test_text]) == before

    code, output = run_cli(*other, "--overwrite")
    assert code == 0, output
    assert ImageCache(test_image).attrs.weights_id == str(tiny["dinov2_other"].resolve())


def test_a_file_of_other_captions_is_refused(demo, tiny, tmp_path):
    data = copy_demo(demo, tmp_path)
    args = ["extract", "--text-encoder", "bert", "--text-weights", tiny["bert"], "--dataset",
            "f30k", "--data-path", data, "--split", "dev", "--out", tmp_path / "out"]
    assert run_cli(*args)[0] == 0
    captions = (data / "dev_caps.txt").read_text().splitlines()
    captions[3] = "a caption edited since"
    (data / "dev_caps.txt").write_text("\n".join(captions) + "\n")
    code, message = run_cli(*args)
    assert code == 2 and message.startswith(f"{tmp_path / 'out' / 'f30k' / 'dev' / 'text-bert.h5'}:")
    assert "captions differ from row 3" in message and "'a caption edited since'" in message


def test_summary_keeps_the_entries_of_every_call(demo, tiny, tmp_path):
    assert run_cli(*tiny_args(demo, tmp_path, tiny, "--split", "dev"))[0] == 0
    code, output = run_cli("extract", "--backbone", "efficientnet_lite0", "--dataset", "f30k",
                           "--data-path", demo, "--images", demo / "images", "--split", "dev",
                           "--batch-size", 5, "--workers", 0, "--device", "cpu", "--out", tmp_path)
    assert code == 0, output
    summary_file = tmp_path / "f30k" / "extract-summary.json"
    entries = json.loads(summary_file.read_text())["files"]
    assert list(entries) == ["dev/image-dinov2.h5", "dev/image-efficientnet_lite0.h5",
                             "dev/text-bert.h5"]
    assert entries["dev/image-dinov2.h5"]["settings"]["backbone"] == "dinov2"
    assert entries["dev/text-bert.h5"]["settings"]["text_encoder"] == "bert"
    assert entries["dev/image-efficientnet_lite0.h5"]["settings"]["backbone"] == "efficientnet_lite0"
    assert all(e["status"] == "written" for e in entries.values())

    assert run_cli(*tiny_args(demo, tmp_path, tiny, "--split", "dev"))[0] == 0  # keeps both files
    assert json.loads(summary_file.read_text())["files"] == entries  # the writing call's entries
    assert [p.name for p in summary_file.parent.iterdir() if p.is_file()] == [summary_file.name]


def test_summary_of_an_earlier_version_is_merged(demo, tiny, tmp_path):
    summary_file = tmp_path / "f30k" / "extract-summary.json"
    summary_file.parent.mkdir(parents=True)
    old = {"file": str(tmp_path / "f30k" / "dev" / "image-old.h5"), "status": "written", "rows": 5}
    summary_file.write_text(json.dumps({"settings": {"backbone": "old"}, "files": [old]}))
    assert run_cli(*tiny_args(demo, tmp_path, tiny, "--split", "dev"))[0] == 0
    entries = json.loads(summary_file.read_text())["files"]
    assert entries["dev/image-old.h5"] == {**old, "settings": {"backbone": "old"}}
    assert "dev/image-dinov2.h5" in entries
    summary_file.write_text("{not json")
    code, message = run_cli(*tiny_args(demo, tmp_path, tiny, "--split", "dev"))
    assert code == 2 and message.startswith(f"{summary_file}: unreadable summary")


def test_progress_off_a_terminal_is_plain_lines(demo, tiny, tmp_path):
    code, output = run_cli(*tiny_args(demo, tmp_path, tiny, "--split", "dev", "--batch-size", 2))
    assert code == 0, output
    assert "\r" not in output
    lines = [line for line in output.splitlines() if line.startswith("image-dinov2.h5: ")]
    assert "0/5" in lines[0] and "5/5" in lines[-1]


def test_weights_note_is_written_shown_and_not_identity(demo, tiny, tmp_path):
    weights = tmp_path / "noted"
    shutil.copytree(tiny["dinov2"], weights)
    note = "a tiny random DINOv2, not facebook/dinov2-small"
    (weights / "conversion.json").write_text(json.dumps({"description": note}))
    args = tiny_args(demo, tmp_path / "out", tiny, "--split", "dev")
    args[args.index("--weights") + 1] = weights
    assert run_cli(*args)[0] == 0
    image_file, text_file = files(tmp_path / "out", "dev")
    assert ImageCache(image_file).attrs.weights_note == note
    assert TextCache(text_file).attrs.weights_note == ""
    code, output = run_cli("info", image_file)
    assert code == 0 and f"weights: {note}" in output

    with h5py.File(image_file, "r+") as f:  # a cache written before the attribute existed
        del f.attrs["weights_note"]
    assert ImageCache(image_file).attrs.weights_note == ""
    code, output = run_cli(*args)
    assert code == 0 and f"kept {image_file}" in output  # the note is not part of the identity

    (weights / "conversion.json").write_text("[1, 2")
    code, message = run_cli(*args)
    assert code == 2 and message.startswith(f"{weights / 'conversion.json'}: unreadable")


def test_partial_file_of_other_weights_is_refused(demo, tiny, tmp_path):
    data = copy_demo(demo, tmp_path)
    broken = data / "images" / "scene_00006.jpg"
    good = broken.read_bytes()
    broken.write_bytes(good[: len(good) // 3])
    args = tiny_args(data, tmp_path / "out", tiny, "--split", "train", "--limit", 10,
                     "--batch-size", 3)
    code, message = run_cli(*args)
    assert code == 2
    assert message.startswith(f"{broken}: cannot decode image") and "(row 6)" in message
    image_file = files(tmp_path / "out")[0]
    assert not image_file.exists()
    report = describe(partial_path(image_file))
    assert report["rows_written"] == 6 and not report["valid"]

    broken.write_bytes(good)
    other = list(args)
    other[other.index("--weights") + 1] = tiny["dinov2_other"]
    code, message = run_cli(*other)
    assert code == 2
    assert "image-dinov2.h5.partial: the interrupted run used different settings" in message
    assert "weights_id" in message and "--overwrite" in message
    code, output = run_cli(*args)  # the original settings resume from row 6
    assert code == 0 and "from 6" in output


def _rows_committed(path: Path) -> int:
    try:
        with h5py.File(path, "r", locking=False) as f:
            return int(f.attrs["rows_written"])
    except Exception:  # noqa: BLE001 - the writer may be mid-flush; try again
        return 0


def test_resume_after_sigkill_equals_an_uninterrupted_run(demo, tmp_path):
    args = ["extract", "--backbone", "efficientnet_lite0", "--dataset", "f30k", "--data-path",
            demo, "--images", demo / "images", "--split", "train", "--limit", 24,
            "--batch-size", 2, "--workers", 0, "--device", "cpu"]
    killed_out = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1", HDF5_USE_FILE_LOCKING="FALSE")
    process = subprocess.Popen(CLI_PY + [str(a) for a in args] + ["--out", str(killed_out)],
                               cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    partial = partial_path(killed_out / "f30k" / "train" / "image-efficientnet_lite0.h5")
    while process.poll() is None:  # kill on an event (rows committed), never on a clock
        if partial.exists() and _rows_committed(partial) >= 4:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    process.wait()
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()[-2000:]
    committed = _rows_committed(partial)
    assert 4 <= committed < 24 and not partial.with_suffix("").exists()

    code, output = run_cli(*args, "--out", killed_out)
    assert code == 0, output
    assert f"from {committed}" in output
    assert run_cli(*args, "--out", tmp_path / "whole")[0] == 0
    resumed = ImageCache(killed_out / "f30k" / "train" / "image-efficientnet_lite0.h5")
    whole = ImageCache(tmp_path / "whole" / "f30k" / "train" / "image-efficientnet_lite0.h5")
    np.testing.assert_array_equal(np.asarray(resumed.tokens), np.asarray(whole.tokens))
    assert resumed.attrs == whole.attrs and resumed.ids == whole.ids


# ------------------------------------------------------------------------------------------ shards


def test_two_ranks_then_merge_equals_a_single_run(demo, tiny, tmp_path):
    common = ["--split", "train", "--limit", 12, "--batch-size", 3]
    assert run_cli(*tiny_args(demo, tmp_path / "single", tiny, *common))[0] == 0
    sharded = tmp_path / "sharded"
    code, output = run_cli(*tiny_args(demo, sharded, tiny, *common, "--rank", 0, "--world-size", 2))
    assert code == 0 and "--merge" in output
    code, message = run_cli(*tiny_args(demo, sharded, tiny, *common, "--merge"))
    assert code == 2 and "shards of ranks [1] of 2 are missing" in message
    assert run_cli(*tiny_args(demo, sharded, tiny, *common, "--rank", 1, "--world-size", 2))[0] == 0
    shard = sharded / "f30k" / "train" / "image-dinov2.shard-0001-of-0002.h5"
    assert "rows 6..11 of 12" in describe(shard)["shard"]
    assert (sharded / "f30k" / "extract-summary.rank-0001-of-0002.json").exists()

    code, output = run_cli(*tiny_args(demo, sharded, tiny, *common, "--merge"))
    assert code == 0 and output.count("merged") == 2, output
    for merged, single in zip(files(sharded), files(tmp_path / "single")):
        m, s = open_cache(merged), open_cache(single)
        assert m.attrs == s.attrs
        np.testing.assert_array_equal(np.asarray(m.tokens), np.asarray(s.tokens))
    texts_m, texts_s = TextCache(files(sharded)[1]), TextCache(files(tmp_path / "single")[1])
    assert texts_m.captions == texts_s.captions
    np.testing.assert_array_equal(texts_m.image_index, texts_s.image_index)
    merged = stamps(list(files(sharded)))
    code, output = run_cli(*tiny_args(demo, sharded, tiny, *common, "--merge"))
    assert code == 0 and output.count(" kept ") == 2, output  # a rerun keeps the merged files
    assert stamps(list(files(sharded))) == merged


def test_torchrun_environment_selects_the_shard(demo, tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert run_cli(*tiny_args(demo, tmp_path, tiny, "--split", "dev"))[0] == 0
    shard = open_cache(tmp_path / "f30k" / "dev" / "image-dinov2.shard-0001-of-0003.h5")
    assert (shard.attrs.shard_start, shard.attrs.shard_stop, shard.attrs.total_items) == (1, 3, 5)


# ------------------------------------------------------------------------------------------ bad input


def test_missing_image_names_the_file_before_any_work(demo, tiny, tmp_path):
    data = copy_demo(demo, tmp_path)
    (data / "images" / "scene_00003.jpg").unlink()
    code, message = run_cli(*tiny_args(data, tmp_path / "out", tiny, "--split", "train"))
    assert code == 2
    assert message == f"{data / 'images' / 'scene_00003.jpg'}: image file not found (row 3, id 3)"
    assert not (tmp_path / "out").exists()


def test_grayscale_cmyk_and_png_images_just_work(demo, tiny, tmp_path):
    data = copy_demo(demo, tmp_path)
    images = data / "images"
    Image.open(images / "scene_00055.jpg").convert("L").save(images / "scene_00055.jpg")
    Image.open(images / "scene_00056.jpg").convert("CMYK").save(images / "scene_00056.jpg")
    Image.open(images / "scene_00057.jpg").convert("RGBA").save(images / "scene_00057.png")
    mapping = json.loads((data / "id_mapping.json").read_text())
    mapping["57"] = "scene_00057.png"
    (data / "id_mapping.json").write_text(json.dumps(mapping))
    code, output = run_cli(*tiny_args(data, tmp_path / "out", tiny, "--split", "test"))
    assert code == 0, output
    cache = ImageCache(files(tmp_path / "out", "test")[0])
    assert cache.paths[2] == "scene_00057.png" and np.isfinite(np.asarray(cache.tokens)).all()


@pytest.mark.parametrize("problem", ["count", "mapping"])
def test_caption_file_problems_name_file_and_line(demo, tiny, tmp_path, problem):
    data = copy_demo(demo, tmp_path)
    if problem == "count":
        ids = (data / "dev_ids.txt").read_text().splitlines()
        (data / "dev_ids.txt").write_text("\n".join(ids[:-2]) + "\n")
        expected = f"{data / 'dev_ids.txt'}: 23 ids for the 25 captions"
    else:
        mapping = json.loads((data / "id_mapping.json").read_text())
        del mapping["51"]
        (data / "id_mapping.json").write_text(json.dumps(mapping))
        expected = f"{data / 'dev_ids.txt'}:6: id '51' is not in {data / 'id_mapping.json'}"
    code, message = run_cli(*tiny_args(data, tmp_path / "out", tiny, "--split", "dev"))
    assert code == 2 and message.startswith(expected), message


def test_unknown_backbone_and_missing_weights_folder(demo, tmp_path):
    base = ["extract", "--dataset", "f30k", "--data-path", demo, "--images", demo / "images",
            "--out", tmp_path, "--device", "cpu"]
    code, message = run_cli(*base, "--backbone", "resnet9000")
    assert code == 2 and message.startswith("unknown image encoder 'resnet9000'; available:")
    assert "dinov2" in message
    code, message = run_cli(*base, "--text-encoder", "gpt")
    assert code == 2 and "unknown text encoder 'gpt'" in message
    code, message = run_cli(*base, "--backbone", "dinov2", "--weights", tmp_path / "nowhere",
                            "--split", "dev")
    assert code == 2 and f"{tmp_path / 'nowhere'}" in message and "does not exist" in message
    code, message = run_cli(*base, "--split", "dev")
    assert code == 2 and "--backbone" in message
    code, message = run_cli(*base, "--backbone", "efficientnet_lite0", "--threads", 0)
    assert code == 2 and message == "--threads must be >= 1, got 0"


def test_cli_py_prints_one_line_and_exits_2(demo, tmp_path):
    """Through a real subprocess: the user sees one line on stderr and exit status 2."""
    process = subprocess.run(
        CLI_PY + ["extract", "--backbone", "nope", "--dataset", "f30k", "--data-path", str(demo)],
        cwd=REPO_ROOT, capture_output=True, text=True)
    assert process.returncode == 2
    assert process.stderr.strip().splitlines() == [
        process.stderr.strip()] and "unknown image encoder 'nope'" in process.stderr


# ------------------------------------------------------------------------------------------ real data


def test_real_flickr8k_efficientnet_and_minilm(shared_data, tmp_path):
    code, output = run_cli(
        "extract", "--backbone", "efficientnet_lite0", "--text-encoder", "minilm",
        "--dataset", "f8k", "--data-path", shared_data / "f8k",
        "--images", shared_data / "flickr8k-images", "--split", "test", "--limit", 6,
        "--batch-size", 4, "--workers", 1, "--device", "cpu", "--out", tmp_path)
    assert code == 0, output
    images = ImageCache(tmp_path / "f8k" / "test" / "image-efficientnet_lite0.h5")
    texts = TextCache(tmp_path / "f8k" / "test" / "text-minilm.h5")
    assert len(images) == 6 and images.attrs.grid == (7, 7) and images.attrs.dim == 1280
    assert images.attrs.weights_id == "efficientnet-lite0-imagenet"
    captions = (shared_data / "f8k" / "test_caps.txt").read_text().splitlines()[:30]
    assert texts.captions == [c.strip() for c in captions] and texts.attrs.dim == 384
    assert texts.input_ids(0)[0] == 101 and texts.input_ids(0)[-1] == 102  # [CLS] ... [SEP]
    tokens = np.asarray(images.tokens).astype(np.float32)
    assert np.isfinite(tokens).all() and (tokens >= 0).all()  # ReLU6 head feature map
    np.testing.assert_allclose(tokens[:, 0], tokens[:, 1:].mean(axis=1), atol=2e-2)
