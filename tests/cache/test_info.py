"""``describe`` / ``cli info`` on a ``.partial`` file while its writer holds it open (this process
and another one), and on a cache written before the ``weights_note`` attribute existed."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

from cache.store import ImageCacheWriter, TextCacheWriter, describe, open_cache, open_h5
from tests.cache.test_store import D, N_IMG, T, image_attrs, text_attrs, write_images
from tests.extract.cli_helpers import CLI_PY, REPO_ROOT, run_cli


@pytest.fixture()
def writing(tmp_path):
    """An image writer with 3 of 7 rows committed, still open (an extraction in progress)."""
    tokens = np.random.default_rng(0).normal(size=(N_IMG, T, D)).astype(np.float16)
    writer = ImageCacheWriter(tmp_path / "image-enc.h5", image_attrs(),
                              [f"id{i}" for i in range(N_IMG)], [f"{i}.jpg" for i in range(N_IMG)])
    writer.append(tokens[:3])
    yield writer
    writer.close()


def test_describe_a_partial_file_its_writer_holds_open(writing):
    report = describe(writing.partial)
    assert report["partial"] and not report["valid"] and not report["complete"]
    assert report["rows_written"] == 3
    assert report["problem"].startswith("partial file: 3 of 7 rows committed so far")
    assert report["attributes"]["rows_written"] == 3
    writing.append(np.zeros((2, T, D), np.float16))  # the writer goes on; describe follows
    assert describe(writing.partial)["rows_written"] == 5


def test_describe_a_text_partial_file_its_writer_holds_open(tmp_path):
    states = [np.ones((n, D), np.float16) for n in (3, 4, 2)]
    with TextCacheWriter(tmp_path / "text-txt.h5", text_attrs(3), [[1] * 3, [2] * 4, [3] * 2],
                         ["a", "b", "c"], [0, 0, 1]) as writer:
        writer.append(states[:1])
        report = describe(writer.partial)
        assert report["partial"] and report["rows_written"] == 1
        writer.append(states[1:])
        writer.finish()
    assert describe(tmp_path / "text-txt.h5")["valid"]


def test_cli_info_on_a_partial_file_in_this_process(writing):
    code, output = run_cli("info", writing.partial)
    assert code == 1  # not valid (yet)
    assert output.startswith(f"{writing.partial}: PARTIAL: partial file: 3 of 7 rows committed")
    code, output = run_cli("info", "--json", writing.partial)
    report, = json.loads(output)
    assert report["partial"] and report["rows_written"] == 3


def test_describe_and_cli_info_from_another_process(writing):
    """The writer holds HDF5's file lock: a plain read-only open in another process fails (what
    `cli info` used to do); `cli info` reads without the lock."""
    env = {k: v for k, v in os.environ.items() if k != "HDF5_USE_FILE_LOCKING"}
    plain = subprocess.run([sys.executable, "-c", "import h5py, sys; h5py.File(sys.argv[1], 'r')",
                            str(writing.partial)], env=env, capture_output=True, text=True)
    assert plain.returncode != 0 and "unable to lock file" in plain.stderr
    process = subprocess.run(CLI_PY + ["info", "--json", str(writing.partial)], cwd=REPO_ROOT,
                             env=env, capture_output=True, text=True)
    assert process.returncode == 1, process.stderr  # partial: not valid yet
    report, = json.loads(process.stdout)
    assert report["partial"] and report["rows_written"] == 3
    assert report["problem"].startswith("partial file: 3 of 7 rows committed so far")


def test_a_cache_without_weights_note_still_opens(tmp_path):
    tokens = np.zeros((N_IMG, T, D), np.float16)
    ids = [f"id{i}" for i in range(N_IMG)]
    path = write_images(tmp_path / "old.h5", tokens, ids, ids,
                        attrs=image_attrs(weights_note="a fine-tune, not the original"))
    assert open_cache(path).attrs.weights_note == "a fine-tune, not the original"
    assert describe(path)["weights_note"] == "a fine-tune, not the original"
    with h5py.File(path, "r+") as f:
        del f.attrs["weights_note"]
    cache = open_cache(path)
    assert cache.attrs.weights_note == "" and cache.attrs == image_attrs()
    assert not cache.attrs.identity_diff(image_attrs(weights_note="a note"))
    report = describe(path)
    assert report["valid"] and report["weights_note"] == ""
    code, output = run_cli("info", path)
    assert code == 0 and "weights:" not in output


def test_open_h5_shares_a_file_this_process_writes(writing):
    with open_h5(writing.partial) as f:
        assert int(f.attrs["rows_written"]) == 3
