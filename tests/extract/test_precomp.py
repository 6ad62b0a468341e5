"""``cli import-precomp``: SCAN .npy (one row per image, or five copies per caption), TERAN .npz,
and the errors for files that do not fit their captions."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cache.store import ImageCache
from tests.extract.cli_helpers import run_cli

N, R, D = 5, 4, 8


def write_captions(root: Path, split: str = "test", mapping: bool = True) -> list[str]:
    ids = [str(100 + i) for i in range(N)]
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{split}_caps.txt").write_text(
        "".join(f"image {i} caption {k}\n" for i in range(N) for k in range(5)))
    (root / f"{split}_ids.txt").write_text("".join(f"{i}\n" for i in ids for _ in range(5)))
    if mapping:
        (root / "id_mapping.json").write_text(json.dumps({i: f"img_{i}.jpg" for i in ids}))
    return ids


def features(rows: int = N, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(rows, R, D)).astype(np.float32)


def import_scan(data: Path, out: Path, *extra: object) -> tuple[int, str]:
    return run_cli("import-precomp", "--dataset", "f30k", "--data-path", data, "--split", "test",
                   "--out", out, *extra)


def cache_of(out: Path, tag: str = "butd") -> ImageCache:
    return ImageCache(out / "f30k" / "test" / f"image-{tag}.h5")


def test_scan_one_row_per_image(tmp_path):
    ids = write_captions(tmp_path / "data")
    array = features()
    np.save(tmp_path / "data" / "test_ims.npy", array)
    code, output = import_scan(tmp_path / "data", tmp_path / "out")
    assert code == 0, output
    cache = cache_of(tmp_path / "out")
    np.testing.assert_array_equal(np.asarray(cache.tokens), array.astype(np.float16))
    assert cache.ids == ids and cache.paths == [f"img_{i}.jpg" for i in ids]
    a = cache.attrs
    assert (a.num_tokens, a.dim, a.prefix_tokens, a.grid, a.encoder) == (R, D, 0, None, "butd")
    assert a.preprocessing["rows"] == "one row per image"
    assert (tmp_path / "out" / "f30k" / "import-summary.json").exists()


def test_scan_five_copies_per_image_equals_one_row_per_image(tmp_path, monkeypatch):
    monkeypatch.setattr("extract.precomp.CHUNK_ROWS", 2)  # several streamed blocks
    write_captions(tmp_path / "data")
    array = features()
    np.save(tmp_path / "data" / "test_ims.npy", np.repeat(array, 5, axis=0))
    code, output = import_scan(tmp_path / "data", tmp_path / "out", "--tag", "old")
    assert code == 0, output
    cache = cache_of(tmp_path / "out", "old")
    np.testing.assert_array_equal(np.asarray(cache.tokens), array.astype(np.float16))
    assert cache.attrs.preprocessing["rows"] == "one row per caption (first copy taken)"


def test_scan_global_vectors_limit_and_explicit_file(tmp_path):
    write_captions(tmp_path / "data", mapping=False)
    vectors = features()[:, 0]
    np.save(tmp_path / "global.npy", vectors)
    code, output = import_scan(tmp_path / "data", tmp_path / "out", "--features",
                               tmp_path / "global.npy", "--limit", 3)
    assert code == 0, output
    cache = cache_of(tmp_path / "out")
    assert len(cache) == 3 and cache.attrs.num_tokens == 1
    assert cache.paths == cache.ids  # no id_mapping.json: ids stand in for paths
    np.testing.assert_array_equal(cache.read([2])[0][0, 0], vectors[2].astype(np.float16))


@pytest.mark.parametrize("rows", [N + 1, 5 * N - 1])
def test_scan_row_count_that_fits_no_layout_names_the_file(tmp_path, rows):
    write_captions(tmp_path / "data")
    np.save(tmp_path / "data" / "test_ims.npy", features(rows))
    code, message = import_scan(tmp_path / "data", tmp_path / "out")
    assert code == 2
    assert message.startswith(f"{tmp_path / 'data' / 'test_ims.npy'}: {rows} rows, but "
                              f"{tmp_path / 'data' / 'test_caps.txt'} has 25 captions of 5 images")
    assert not (tmp_path / "out" / "f30k" / "test" / "image-butd.h5").exists()


def test_scan_bad_arrays(tmp_path):
    write_captions(tmp_path / "data")
    npy = tmp_path / "data" / "test_ims.npy"
    np.save(npy, features(5 * N))  # one row per caption, but the copies differ
    code, message = import_scan(tmp_path / "data", tmp_path / "out")
    assert code == 2 and "rows 0 and 1 (captions of the same image) differ" in message
    np.save(npy, np.zeros((N, R, D), np.int64))
    code, message = import_scan(tmp_path / "data", tmp_path / "out")
    assert code == 2 and message.startswith(f"{npy}: expected float features")
    npy.write_bytes(b"garbage")
    code, message = import_scan(tmp_path / "data", tmp_path / "out")
    assert code == 2 and message.startswith(f"{npy}: not a readable .npy array")
    npy.unlink()
    code, message = import_scan(tmp_path / "data", tmp_path / "out")
    assert code == 2 and message == f"{npy}: features file not found"


def test_import_keeps_the_same_import_and_refuses_another(tmp_path):
    write_captions(tmp_path / "data")
    np.save(tmp_path / "data" / "test_ims.npy", features())
    assert import_scan(tmp_path / "data", tmp_path / "out")[0] == 0
    target = tmp_path / "out" / "f30k" / "test" / "image-butd.h5"
    before = (target.stat().st_mtime_ns, target.read_bytes())
    code, output = import_scan(tmp_path / "data", tmp_path / "out")
    assert code == 0 and "kept" in output
    assert (target.stat().st_mtime_ns, target.read_bytes()) == before
    np.save(tmp_path / "data" / "test_ims.npy", features(seed=1))
    code, message = import_scan(tmp_path / "data", tmp_path / "out")
    assert code == 2 and message.startswith(f"{target}: a complete cache from a different")
    assert "weights_hash" in message and "--overwrite" in message
    assert import_scan(tmp_path / "data", tmp_path / "out", "--overwrite")[0] == 0
    np.testing.assert_array_equal(np.asarray(cache_of(tmp_path / "out").tokens),
                                  features(seed=1).astype(np.float16))


def test_teran_npz_with_boxes(tmp_path):
    ids = write_captions(tmp_path / "data")
    feats, boxes, images = tmp_path / "feat", tmp_path / "box", tmp_path / "images"
    for folder in (feats, boxes, images):
        folder.mkdir()
    rng = np.random.default_rng(0)
    expected = []
    for row, image_id in enumerate(ids):
        regions = R if row != 2 else R - 1  # fewer regions: zero-padded, length says so
        feat = rng.normal(size=(regions, D)).astype(np.float32)
        expected.append(feat)
        np.savez(feats / f"{image_id}.npz", feat=feat)
        np.save(boxes / f"{image_id}.npy", np.full((regions, 4), row, np.float32))
        Image.new("RGB", (30 + row, 20)).save(images / f"img_{image_id}.jpg")
    code, output = run_cli("import-precomp", "--format", "teran", "--dataset", "f30k",
                           "--data-path", tmp_path / "data", "--split", "test",
                           "--features", feats, "--boxes", boxes, "--images", images,
                           "--out", tmp_path / "out", "--tag", "teran")
    assert code == 0, output
    cache = cache_of(tmp_path / "out", "teran")
    tokens, lengths = cache.read(np.arange(N))
    np.testing.assert_array_equal(lengths, [R, R, R - 1, R, R])
    np.testing.assert_array_equal(tokens[2, :R - 1], expected[2].astype(np.float16))
    assert not tokens[2, R - 1:].any()
    box, wh = cache.read_boxes([2, 4])
    assert (box[0, :R - 1] == 2).all() and wh.tolist() == [[32, 20], [34, 20]]

    (feats / f"{ids[3]}.npz").unlink()
    code, message = run_cli("import-precomp", "--format", "teran", "--dataset", "f30k",
                            "--data-path", tmp_path / "data", "--split", "test",
                            "--features", feats, "--out", tmp_path / "out2")
    assert code == 2
    assert message == f"{feats / (ids[3] + '.npz')}: features file not found (row 3, id {ids[3]})"
