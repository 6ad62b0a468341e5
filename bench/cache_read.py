"""Benchmark: random training batches from an HDF5 image cache vs the same array as a .npy memmap.

Writes a synthetic fp16 image cache through ``cache.store.ImageCacheWriter`` and the identical array
as a ``.npy`` file, warms the page cache, then reads the same sequence of random batches (like a
shuffled training epoch) through ``ImageCache.read`` and through ``np.load(mmap_mode="r")[rows]``.
Also shown for reference: plain h5py fancy indexing (sorted rows) of the same dataset.

    python bench/cache_read.py --rows 4000 --tokens 50 --dim 384 --batch 128 --batches 200

The ratio printed last is (our reader's throughput) / (NumPy memmap's throughput), measured in the
same run; the target is >= 0.8.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from cache.store import CacheAttrs, ImageCache, ImageCacheWriter
from machine import print_machine


def _write(root: Path, rows: int, tokens: int, dim: int) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    attrs = CacheAttrs(modality="image", encoder="synthetic", weights_id="-", weights_hash="-",
                       dim=dim, num_items=rows, num_tokens=tokens)
    ids = [str(i) for i in range(rows)]
    h5_path, npy_path = root / "image-synthetic.h5", root / "tokens.npy"
    npy = np.lib.format.open_memmap(npy_path, mode="w+", dtype=np.float16, shape=(rows, tokens, dim))
    with ImageCacheWriter(h5_path, attrs, ids, ids) as writer:
        for start in range(0, rows, 256):
            block = rng.standard_normal((min(256, rows - start), tokens, dim), np.float32)
            block = block.astype(np.float16)
            writer.append(block)
            npy[start:start + len(block)] = block
        writer.finish()
    npy.flush()
    del npy
    return h5_path, npy_path


def _time(read, batches: list[np.ndarray], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for rows in batches:
            read(rows)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--tokens", type=int, default=50)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many passes")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args()
    print_machine()

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        h5_path, npy_path = _write(Path(tmp), args.rows, args.tokens, args.dim)
        rng = np.random.default_rng(1)
        batches = [rng.choice(args.rows, args.batch, replace=False) for _ in range(args.batches)]
        cache = ImageCache(h5_path)
        npy = np.load(npy_path, mmap_mode="r")
        handle = h5py.File(h5_path, "r")
        dset = handle["tokens"]
        for rows in batches[:2]:  # sanity: identical bytes
            assert np.array_equal(cache.read(rows)[0], npy[rows])
        np.asarray(npy[:]).sum(), np.asarray(cache.tokens[:]).sum()  # warm the page cache

        def h5py_read(rows: np.ndarray) -> np.ndarray:
            return dset[np.sort(rows)]

        candidates = {
            "ImageCache.read (ours)": lambda rows: cache.read(rows),
            "np.load(mmap_mode='r')[rows]": lambda rows: np.ascontiguousarray(npy[rows]),
            "h5py dataset[sorted rows]": h5py_read,
        }
        mb = args.batches * args.batch * args.tokens * args.dim * 2 / 1e6
        seconds = {name: _time(fn, batches, args.repeats if "h5py" not in name else 1)
                   for name, fn in candidates.items()}
        handle.close()

    print(f"{args.batches} random batches of {args.batch} rows, tokens [{args.rows}, {args.tokens}, "
          f"{args.dim}] fp16 ({mb:.0f} MB read per pass)")
    print(f"{'reader':<32}{'seconds':>10}{'batches/s':>12}{'MB/s':>10}")
    for name, s in seconds.items():
        print(f"{name:<32}{s:>10.3f}{args.batches / s:>12.1f}{mb / s:>10.0f}")
    ours, npy_s = seconds["ImageCache.read (ours)"], seconds["np.load(mmap_mode='r')[rows]"]
    print(f"ratio ours/npy throughput = {npy_s / ours:.2f} (target >= 0.8)")


if __name__ == "__main__":
    main()
    print_machine("end")
