"""``cli index`` and ``search.open_index``: a folder of photos indexed with a trained run, queried
by photo and text, updated incrementally, resumed after a kill, refused with one clear line; odd
files reported, a foreign --out refused, concurrent runs on one --out stopped by its lock."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import search
from cache.errors import InputError
from cache.store import ImageCache
from extract import datasets
from heads.checkpoint import load_checkpoint
from search import index as index_module
from search.index import build_index, read_manifest
from search.model import embedding_mode, interaction_mode
from tests.extract.cli_helpers import run_cli
from tests.hostile import hang_guard, png_header
from tests.search.world import PhotoWorld

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _copy_photos(world: PhotoWorld, to: Path) -> Path:
    return Path(shutil.copytree(world.photos, to, symlinks=True))


def _add_bad_files(photos: Path) -> dict[str, str]:
    """Files with image extensions that are no usable photo, and what their reason says."""
    (photos / "zero.jpg").write_bytes(b"")
    (photos / "text.png").write_text("this is not an image")
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    from PIL import Image

    Image.fromarray(noise).save(photos / "whole.jpg", quality=95)
    data = (photos / "whole.jpg").read_bytes()
    (photos / "whole.jpg").unlink()
    (photos / "cut.jpg").write_bytes(data[:len(data) // 2])
    return {"zero.jpg": "0 bytes", "text.png": "not an image", "cut.jpg": "truncated"}


def test_index_reports_bad_files_and_finds_each_photo_by_itself(photo_world: PhotoWorld,
                                                                tmp_path: Path) -> None:
    photos = _copy_photos(photo_world, tmp_path / "photos")
    expected_bad = _add_bad_files(photos)
    out = tmp_path / "index"
    code, output = run_cli("index", photos, "--checkpoint", photo_world.checkpoint, "--out", out,
                           "--device", "cpu", "--batch-size", 4)
    assert code == 0, output
    for name, reason in expected_bad.items():
        assert f"bad file: {name}: " in output and reason in output.split(name)[1].split("\n")[0]
    manifest = read_manifest(out)
    assert [p["path"] for p in manifest["photos"]] == photo_world.good
    assert sorted(b["path"] for b in manifest["bad"]) == sorted(expected_bad)
    assert manifest["kind"] == "flat" and manifest["normalised"]
    assert manifest["checkpoint"]["head"] == "linear" and manifest["checkpoint"]["mode"] is None
    assert all(len(p["sha256"]) == 64 and p["size"] > 0 for p in manifest["photos"])
    cache = ImageCache(out / manifest["cache"])                 # our HDF5 format, paths relative
    assert [p for p in cache.paths if p != "cut.jpg"] == photo_world.good  # + the empty row
    embeddings = np.load(out / manifest["embeddings"])
    assert embeddings.dtype == np.float32 and embeddings.shape == (len(cache), manifest["dim"])
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.json", "index.lock", manifest["cache"], manifest["embeddings"],
         manifest["faiss"]])

    opened = search.open_index(out)
    assert len(opened) == len(photo_world.good)
    for rel in photo_world.good[:4]:
        results = opened.query_image(photos / rel, k=3)
        assert results.hits[0].path == rel, results
        assert results.hits[0].score == pytest.approx(1.0, abs=1e-3)
    text = opened.query_text("a red circle", k=5)
    assert [h.rank for h in text.hits] == [1, 2, 3, 4, 5] and not text.notes
    assert text.hits == sorted(text.hits, key=lambda h: -h.score)
    with pytest.raises(InputError, match="notes.txt: cannot decode image"):
        opened.query_image(photo_world.photos / "notes.txt")


def test_rerun_extracts_only_new_and_changed_photos_and_survives_a_move(
        photo_world: PhotoWorld, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    photos = _copy_photos(photo_world, tmp_path / "photos")
    out = tmp_path / "index"
    first = build_index(photos, photo_world.checkpoint, out, progress=False)
    assert (first.extracted, first.copied) == (len(photo_world.good), 0)
    before = read_manifest(out)
    again = build_index(photos, photo_world.checkpoint, out, progress=False)
    assert again.up_to_date and read_manifest(out) == before

    added, changed, deleted = "trip/new.jpg", photo_world.good[0], photo_world.good[1]
    shutil.copy(photos / photo_world.good[2], photos / added)
    (photos / changed).write_bytes((photos / photo_world.good[3]).read_bytes())
    (photos / deleted).unlink()
    os.utime(photos / photo_world.good[4], ns=(1, 1))             # touched only: hash decides
    report = build_index(photos, photo_world.checkpoint, out, progress=False)
    assert (report.extracted, report.copied, report.removed) == (2, len(photo_world.good) - 2, 1)
    manifest = read_manifest(out)
    paths = [p["path"] for p in manifest["photos"]]
    assert added in paths and deleted not in paths and changed in paths
    assert len(list(out.glob("images-*.h5"))) == 1               # the old cache was removed
    after_update = read_manifest(out)
    again = build_index(photos, photo_world.checkpoint, out, progress=False)
    assert again.up_to_date and read_manifest(out) == after_update   # rows kept their order
    opened = search.open_index(out)
    assert opened.query_image(photos / added, k=1).hits[0].path in (added, photo_world.good[2])
    assert opened.query_image(photos / changed, k=2).hits[0].path in (
        changed, photo_world.good[3])

    moved = Path(shutil.move(photos, tmp_path / "moved"))           # mtimes kept
    report = build_index(moved, photo_world.checkpoint, out, progress=False)
    assert report.extracted == 0 and read_manifest(out)["images_root"] == str(moved.resolve())
    assert search.open_index(out).query_image(moved / added, k=1).hits[0].path in (
        added, photo_world.good[2])


def test_a_killed_run_resumes_and_never_leaves_a_half_written_index(
        photo_world: PhotoWorld, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    photos = _copy_photos(photo_world, tmp_path / "photos")
    out = tmp_path / "index"
    build_index(photos, photo_world.checkpoint, out, batch_size=4, progress=False)
    before = (out / "manifest.json").read_bytes()
    for i in range(6):
        shutil.copy(photos / photo_world.good[i], photos / f"trip/copy{i}.jpg")

    appended = []
    original = index_module.ImageCacheWriter.append

    def dies_after_four_batches(self, *args, **kwargs):
        if len(appended) == 4:
            raise KeyboardInterrupt
        appended.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(index_module.ImageCacheWriter, "append", dies_after_four_batches)
    with pytest.raises(KeyboardInterrupt):
        build_index(photos, photo_world.checkpoint, out, batch_size=4, progress=False)
    assert (out / "manifest.json").read_bytes() == before          # still the old index
    assert search.open_index(out).query_image(photos / photo_world.good[0], k=1).hits
    (partial,) = out.glob("images-*.h5.partial")
    written = ImageCache(partial, allow_incomplete=True).rows_written
    assert written == 14         # 10 unchanged rows copied (4 + 4 + 2), one batch of 4 new ones
    monkeypatch.setattr(index_module.ImageCacheWriter, "append", original)
    report = build_index(photos, photo_world.checkpoint, out, batch_size=4, progress=False)
    assert report.photos == len(photo_world.good) + 6 and not partial.exists()
    assert (report.extracted, report.copied) == (2, len(photo_world.good))  # 4 before the kill
    fresh = tmp_path / "fresh"
    build_index(photos, photo_world.checkpoint, fresh, batch_size=4, workers=1, progress=False)
    by_path = []
    for folder in (out, fresh):                    # rows differ in order: kept first, then new
        manifest = read_manifest(folder)
        embeddings = np.load(folder / manifest["embeddings"])
        by_path.append({p["path"]: embeddings[p["row"]] for p in manifest["photos"]})
    assert by_path[0].keys() == by_path[1].keys()
    for path, vector in by_path[0].items():
        np.testing.assert_allclose(vector, by_path[1][path], atol=1e-5, err_msg=path)


def test_hnsw_finds_a_photo_by_itself(photo_world: PhotoWorld, tmp_path: Path) -> None:
    out = tmp_path / "hnsw"
    build_index(photo_world.photos, photo_world.checkpoint, out, kind="hnsw", progress=False)
    opened = search.open_index(out)
    assert opened.manifest["kind"] == "hnsw"
    hits = opened.query_image(photo_world.photos / photo_world.good[0], k=3).hits
    assert hits[0].path == photo_world.good[0]


def test_ivf_pq_on_a_folder_too_small_to_train_it_falls_back_to_flat(photo_world: PhotoWorld,
                                                                     tmp_path: Path) -> None:
    out = tmp_path / "ivf"
    code, output = run_cli("index", photo_world.photos, "--checkpoint", photo_world.checkpoint,
                           "--out", out, "--kind", "ivf-pq", "--device", "cpu", "--no-progress")
    assert code == 0, output
    assert "note: --kind ivf-pq needs at least 78 photos" in output and "flat" in output
    opened = search.open_index(out)
    assert opened.manifest["kind"] == "flat"
    hits = opened.query_image(photo_world.photos / photo_world.good[0], k=3).hits
    assert hits[0].path == photo_world.good[0]
    code, output = run_cli("index", photo_world.photos, "--checkpoint", photo_world.checkpoint,
                           "--out", out, "--kind", "ivf-pq", "--device", "cpu", "--no-progress")
    assert code == 0 and "up to date" in output and "note: --kind ivf-pq" in output, output


def test_heads_without_an_embedding_branch_are_refused_with_those_that_work() -> None:
    state = {"path": "runs/scan/best.pt", "head_name": "scan"}
    with pytest.raises(InputError, match=r"no embedding branch .*linear.*vse"):
        embedding_mode(state)
    assert embedding_mode({**state, "head_name": "tgdt"}) == "global"
    assert embedding_mode({**state, "head_name": "aladin"}) == "student"
    assert embedding_mode({**state, "head_name": "vse"}) is None
    assert interaction_mode({**state, "head_name": "tgdt"}) == "local"
    assert interaction_mode(state) is None
    with pytest.raises(InputError, match="no interaction branch"):
        interaction_mode({**state, "head_name": "linear"})


def test_user_errors_are_one_line(photo_world: PhotoWorld, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    code, message = run_cli("index", empty, "--checkpoint", photo_world.checkpoint, "--out",
                            tmp_path / "i1", "--device", "cpu")
    assert code == 2 and "no photos" in message
    bad = tmp_path / "bad"
    bad.mkdir()
    _add_bad_files(bad)
    code, message = run_cli("index", bad, "--checkpoint", photo_world.checkpoint, "--out",
                            tmp_path / "i2", "--device", "cpu")
    assert code == 2 and "none of the 3 files is a photo" in message
    assert not (tmp_path / "i2" / "manifest.json").exists()

    state = load_checkpoint(photo_world.checkpoint)
    state["features"]["image"]["weights_id"] = str(tmp_path / "no-such-weights")
    broken = tmp_path / "broken.pt"
    torch.save({k: v for k, v in state.items() if k != "path"}, broken)
    code, message = run_cli("index", photo_world.photos, "--checkpoint", broken, "--out",
                            tmp_path / "i3", "--device", "cpu")
    assert code == 2 and "cannot load the backbone (image" in message, message

    state = load_checkpoint(photo_world.checkpoint)
    state["features"]["image"]["weights_hash"] = "0" * 16
    changed = tmp_path / "changed.pt"
    torch.save({k: v for k, v in state.items() if k != "path"}, changed)
    code, message = run_cli("index", photo_world.photos, "--checkpoint", changed, "--out",
                            tmp_path / "i4", "--device", "cpu")
    assert code == 2 and "changed since extraction" in message, message
    code, message = run_cli("search", tmp_path / "i4", "a dog")
    assert code == 2 and "not a photo index" in message


def test_a_folder_of_files_that_are_no_images_at_all(photo_world: PhotoWorld,
                                                     tmp_path: Path) -> None:
    folder = tmp_path / "junk"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"")
    (folder / "b.PNG").write_text("text")
    with pytest.raises(InputError, match=r"none of the 2 files .*a.jpg: empty file"):
        build_index(folder, photo_world.checkpoint, tmp_path / "index", progress=False)
    assert not list((tmp_path / "index").glob("*"))


def test_a_real_photo_dump_is_indexed_with_every_odd_file_reported(
        photo_world: PhotoWorld, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A FIFO, a socket, an unreadable photo, a decompression bomb, a link out of the folder, a
    non-UTF-8 name and one with terminal escape codes: indexed or reported, never a hang or a
    traceback, every printed path escaped; the rerun is a no-op."""
    photos = _copy_photos(photo_world, tmp_path / "photos")
    os.mkfifo(photos / "pipe.jpg")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(photos / "sock.png"))
    png_header(photos / "bomb.png", 20000, 20000)
    odd = os.fsdecode(b"trip/bad\xff\xfename.jpg")
    evil = "trip/evil\x1b[2J\nname.jpg"
    shutil.copy(photos / photo_world.good[0], photos / odd)
    shutil.copy(photos / photo_world.good[1], photos / evil)
    shutil.copy(photos / photo_world.good[2], photos / "locked.jpg")
    shutil.copy(photos / photo_world.good[3], tmp_path / "outside.jpg")
    os.symlink(tmp_path / "outside.jpg", photos / "away.jpg")
    os.symlink("/etc", photos / "etc")
    locked, real_open = str(photos / "locked.jpg"), os.open

    def refusing_open(path, flags, *args, **kwargs):     # root reads mode 000: refuse at open(2)
        if os.fspath(path) == locked:
            raise PermissionError(13, "Permission denied", locked)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(datasets.os, "open", refusing_open)
    out = tmp_path / "index"
    try:
        with hang_guard():
            code, output = run_cli("index", photos, "--checkpoint", photo_world.checkpoint,
                                   "--out", out, "--device", "cpu", "--no-progress")
            assert code == 0, output
            again_code, again = run_cli("index", photos, "--checkpoint", photo_world.checkpoint,
                                        "--out", out, "--device", "cpu", "--no-progress")
    finally:
        server.close()
    assert "\x1b" not in output and "\udcff" not in output
    lines = output.splitlines()
    assert "skipped: pipe.jpg: not a regular file (FIFO)" in lines
    assert "skipped: sock.png: not a regular file (socket)" in lines
    assert any(line.startswith("skipped: away.jpg: symbolic link to outside") for line in lines)
    assert any(line.startswith("skipped: etc: symbolic link to outside") for line in lines)
    assert any(line.startswith("bad file: bomb.png: image too large") for line in lines), output
    assert "bad file: locked.jpg: cannot read: Permission denied" in lines
    assert f"{len(photo_world.good) + 2} photos indexed" in lines[-1]
    assert "2 bad, 4 skipped" in lines[-1]
    manifest = read_manifest(out)
    paths = [p["path"] for p in manifest["photos"]]
    assert odd in paths and evil in paths and "away.jpg" not in paths
    assert not any("passwd" in p for p in paths)
    assert again_code == 0 and "up to date" in again and "2 bad, 4 skipped" in again, again

    code, table = run_cli("search", out, "--image", photos / odd, "-k", 3, "--device", "cpu")
    assert code == 0 and "\x1b" not in table, table
    rows = table.strip().splitlines()            # the photo and its twin (the same pixels)
    assert len(rows) == 4 and any(row.endswith("trip/bad\\xff\\xfename.jpg") for row in rows[1:3])
    code, table = run_cli("search", out, "--image", photos / evil, "-k", 2, "--json")
    assert "trip/evil\\x1b[2J\\nname.jpg" in [hit["path"] for hit in json.loads(table)["hits"]]


def test_a_foreign_out_folder_is_refused_and_only_our_files_are_ever_deleted(
        photo_world: PhotoWorld, tmp_path: Path) -> None:
    foreign = tmp_path / "mine"
    foreign.mkdir()
    for name in ("embeddings-1.npy", "index-2.faiss", "images-3.h5", "notes.txt"):
        (foreign / name).write_text("the user's")
    code, message = run_cli("index", photo_world.photos, "--checkpoint", photo_world.checkpoint,
                            "--out", foreign, "--device", "cpu")
    assert code == 2 and "no index of cli index" in message, message
    assert sorted(p.name for p in foreign.iterdir()) == [
        "embeddings-1.npy", "images-3.h5", "index-2.faiss", "notes.txt"]

    out = tmp_path / "index"
    build_index(photo_world.photos, photo_world.checkpoint, out, progress=False)
    planted = out / "index-0123456789ab.faiss"           # looks like ours, is not in the manifest
    planted.write_text("the user's")
    photos = _copy_photos(photo_world, tmp_path / "photos")
    (photos / photo_world.good[0]).unlink()
    build_index(photos, photo_world.checkpoint, out, progress=False)
    assert planted.read_text() == "the user's"
    assert len(list(out.glob("images-*.h5"))) == 1 and len(list(out.glob("index-*.faiss"))) == 2


def test_concurrent_runs_on_one_out_are_refused_and_a_corrupt_partial_is_rebuilt(
        photo_world: PhotoWorld, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "index"
    out.mkdir()
    holder = subprocess.Popen(      # another cli index: holds the lock until its stdin closes
        [sys.executable, "-c", "import sys; from pathlib import Path; "
         "from search.index import _locked\n"
         f"with _locked(Path({str(out)!r})):\n print('locked', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    try:
        assert holder.stdout.readline() == "locked\n"
        code, message = run_cli("index", photo_world.photos, "--checkpoint",
                                photo_world.checkpoint, "--out", out, "--device", "cpu")
        assert code == 2 and message == (f"another cli index is writing {out} (pid {holder.pid}); "
                                         "wait for it to finish"), message
    finally:
        holder.stdin.close()
        holder.wait()
    assert not list(out.glob("*.partial")) and not (out / "manifest.json").exists()

    original = index_module.ImageCacheWriter.append

    def dies(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(index_module.ImageCacheWriter, "append", dies)
    with pytest.raises(KeyboardInterrupt):
        build_index(photo_world.photos, photo_world.checkpoint, out, progress=False)
    monkeypatch.setattr(index_module.ImageCacheWriter, "append", original)
    (partial,) = out.glob("images-*.h5.partial")
    partial.write_bytes(partial.read_bytes()[:100])                 # cut short by a crash
    code, output = run_cli("index", photo_world.photos, "--checkpoint", photo_world.checkpoint,
                           "--out", out, "--device", "cpu", "--no-progress")
    assert code == 0 and f"note: discarded {partial.name}" in output, output
    assert f"{len(photo_world.good)} photos indexed ({len(photo_world.good)} extracted" in output
    assert not partial.exists()
