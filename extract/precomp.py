"""``cli import-precomp``: region features computed elsewhere, imported into the image-cache format.

Two layouts of the bottom-up-attention (BUTD) region features most papers ship:

* ``scan``: SCAN / VSE∞ ``{split}_ims.npy``, float ``[N, 36, 2048]`` (``[N, 2048]`` is read as one
  token), one row per image; or the older files with one row per *caption* (every image repeated
  five times), detected when the row count equals the caption count of ``{split}_caps.txt``; then the
  first caption's row of every image is taken. The array is streamed with ``np.load(mmap_mode="r")``
  in blocks of rows, never loaded whole.
* ``teran``: TERAN's one ``<image id>.npz`` per image (key ``feat``, ``[R, 2048]``), optionally with
  ``<image id>.npy`` boxes ``[R, 4]`` in pixels; the image sizes for the boxes are read from the
  image file headers (``--images``). Images with fewer regions than the first file are zero-padded
  and their ``lengths`` say how many are valid.

The caption files (``{split}_caps.txt`` / ``{split}_ids.txt``, optional ``id_mapping.json``) give the
image ids and order, so the imported image cache lines up with a text cache written by
``cli extract --text-encoder`` from the same folder. No text file is produced here.
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image

from cache.errors import InputError
from cache.store import CacheAttrs, ImageCacheWriter
from extract.datasets import SplitIndex
from extract.runner import FileReport, keep_existing, kept_report, limit_split

CHUNK_ROWS = 256


def _fingerprint(*parts: bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return digest.hexdigest()[:16]


def _attrs(index: SplitIndex, tag: str, source: str, fingerprint: str, num_tokens: int, dim: int,
           preprocessing: dict, extra: dict) -> CacheAttrs:
    return CacheAttrs(modality="image", encoder=tag, weights_id=source, weights_hash=fingerprint,
                      dim=dim, num_items=index.num_images, num_tokens=num_tokens,
                      preprocessing=preprocessing, dataset=index.dataset, split=index.split,
                      extra=extra)


def _write(index: SplitIndex, attrs: CacheAttrs, out: Path, overwrite: bool,
           blocks: Callable[[int], Iterator[tuple]], with_boxes: bool = False) -> FileReport:
    """Write the cache from ``blocks(first_row)`` (resumable) and report it; a complete file of the
    same import is kept, one of another import is refused unless ``overwrite``."""
    if not overwrite and keep_existing(out, attrs, index.image_ids):
        return kept_report(out, attrs)
    paths = index.image_paths if index.image_paths is not None else index.image_ids
    began = time.perf_counter()
    with ImageCacheWriter(out, attrs, index.image_ids, paths, with_boxes=with_boxes,
                          overwrite=overwrite) as writer:
        done = writer.rows_written
        for block in blocks(done):
            writer.append(*block)
        final = writer.finish()
    return FileReport(final, "image", index.split, attrs.num_items, done,
                      time.perf_counter() - began, "resumed" if done else "written")


# ------------------------------------------------------------------------------------------ SCAN


def scan_rows(index: SplitIndex, features: Path, num_rows: int, caps_file: Path) -> np.ndarray:
    """Row of the ``.npy`` array holding each image: one row per image, or per caption (5 copies)."""
    all_captions = len(index.caption_image_index)
    if num_rows == index.num_images:
        return np.arange(index.num_images)
    if num_rows == all_captions and all_captions != index.num_images:
        _, first_caption = np.unique(index.caption_image_index, return_index=True)
        return first_caption
    raise InputError(f"{features}: {num_rows} rows, but {caps_file} has {all_captions} captions of "
                     f"{index.num_images} images: expected {index.num_images} rows (one per image) "
                     f"or {all_captions} (one per caption)")


def import_scan(index: SplitIndex, features: Path, caps_file: Path, out: Path, tag: str,
                overwrite: bool = False, limit: int | None = None) -> FileReport:
    """Import SCAN's ``{split}_ims.npy`` as the image cache of ``index`` at ``out``.

    ``index`` is the full split (the row mapping needs every caption); ``limit`` keeps the first
    images only.
    """
    if not features.is_file():
        raise InputError(f"{features}: features file not found")
    try:
        array = np.load(features, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise InputError(f"{features}: not a readable .npy array ({exc})") from None
    if array.ndim == 2:
        array = array[:, None, :]
    if array.ndim != 3 or array.dtype.kind != "f":
        raise InputError(f"{features}: expected float features [N, regions, dim], got "
                         f"{array.dtype} {list(array.shape)}")
    rows = scan_rows(index, features, array.shape[0], caps_file)
    per_caption = len(rows) != array.shape[0]
    if per_caption and not np.array_equal(array[rows[0]], array[rows[0] + 1]):
        raise InputError(f"{features}: has one row per caption, but rows {rows[0]} and "
                         f"{rows[0] + 1} (captions of the same image) differ")
    index = limit_split(index, limit)
    rows = rows[:index.num_images]
    fingerprint = _fingerprint(str((array.shape, array.dtype.str)).encode(),
                               np.ascontiguousarray(array[rows[0]]).tobytes(),
                               np.ascontiguousarray(array[rows[-1]]).tobytes())
    layout = "one row per caption (first copy taken)" if per_caption else "one row per image"
    attrs = _attrs(index, tag, f"scan-precomp:{features.name}", fingerprint, array.shape[1],
                   array.shape[2], {"source": "SCAN precomp .npy", "rows": layout},
                   {"features_file": str(features.resolve())})

    def blocks(first: int) -> Iterator[tuple]:
        for lo in range(first, len(rows), CHUNK_ROWS):
            yield (np.asarray(array[rows[lo:lo + CHUNK_ROWS]]),)

    return _write(index, attrs, out, overwrite, blocks)


# ------------------------------------------------------------------------------------------ TERAN


def _load_npz(path: Path, row: int) -> np.ndarray:
    try:
        with np.load(path) as data:
            feat = data["feat"]
    except KeyError:
        raise InputError(f"{path}: no 'feat' array (row {row})") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable .npz file (row {row}): {exc}") from None
    if feat.ndim != 2 or feat.dtype.kind != "f":
        raise InputError(f"{path}: 'feat' must be float [regions, dim], got {feat.dtype} "
                         f"{list(feat.shape)} (row {row})")
    return feat


def _require_files(folder: Path, names: list[str], index: SplitIndex, what: str) -> None:
    if not folder.is_dir():
        raise InputError(f"{folder}: {what} folder not found")
    present = {p.name for p in folder.iterdir()}
    for row, name in enumerate(names):
        if name not in present:
            raise InputError(f"{folder / name}: {what} file not found (row {row}, id "
                             f"{index.image_ids[row]})")


def import_teran(index: SplitIndex, features: Path, out: Path, tag: str,
                 boxes: Path | None = None, overwrite: bool = False) -> FileReport:
    """Import TERAN-style ``<id>.npz`` region features (+ optional ``<id>.npy`` boxes)."""
    names = [f"{image_id}.npz" for image_id in index.image_ids]
    _require_files(features, names, index, "features")
    if boxes is not None:
        _require_files(boxes, [f"{i}.npy" for i in index.image_ids], index, "boxes")
        if index.images_root is None or index.image_paths is None:
            raise InputError(f"{boxes}: boxes need the images (--images and id_mapping.json) "
                             "to record each image's size")
    first = _load_npz(features / names[0], 0)
    num_tokens, dim = first.shape
    attrs = _attrs(index, tag, f"teran-precomp:{features.name}",
                   _fingerprint(first.tobytes(), str(len(names)).encode()), num_tokens, dim,
                   {"source": "TERAN precomp .npz", "boxes": boxes is not None},
                   {"features_dir": str(features.resolve())})

    def load(row: int) -> tuple[np.ndarray, np.ndarray | None, tuple[int, int] | None]:
        feat = _load_npz(features / names[row], row)
        if feat.shape[0] > num_tokens or feat.shape[1] != dim:
            raise InputError(f"{features / names[row]}: 'feat' is {list(feat.shape)}, expected at "
                             f"most {num_tokens} regions of {dim} (as in {names[0]}) (row {row})")
        if boxes is None:
            return feat, None, None
        box_file = boxes / f"{index.image_ids[row]}.npy"
        box = np.load(box_file)
        if box.shape != (feat.shape[0], 4):
            raise InputError(f"{box_file}: boxes {list(box.shape)} for {feat.shape[0]} regions "
                             f"(row {row})")
        with Image.open(index.image_file(row)) as image:
            return feat, box, image.size

    def blocks(first_row: int) -> Iterator[tuple]:
        for lo in range(first_row, index.num_images, CHUNK_ROWS):
            hi = min(lo + CHUNK_ROWS, index.num_images)
            tokens = np.zeros((hi - lo, num_tokens, dim), np.float32)
            lengths = np.zeros(hi - lo, np.int32)
            box_block = np.zeros((hi - lo, num_tokens, 4), np.float32)
            sizes = np.zeros((hi - lo, 2), np.int32)
            for i in range(hi - lo):
                feat, box, size = load(lo + i)
                tokens[i, :len(feat)], lengths[i] = feat, len(feat)
                if box is not None:
                    box_block[i, :len(box)], sizes[i] = box, size
            yield (tokens, lengths) + ((box_block, sizes) if boxes is not None else ())

    return _write(index, attrs, out, overwrite, blocks, with_boxes=boxes is not None)
