"""Benchmark: the full extraction runner vs a bare decode + forward loop, same images, same model.

Both sides decode the same JPEGs with the same ``ImageDataset`` / DataLoader workers and batch size
and run the same frozen encoder under ``torch.inference_mode``; the runner also copies the tokens
to the host as fp16, writes them to HDF5 and commits the row count after every batch. Passes
alternate (bare, runner, bare, runner, ...) after one warm-up pass over the files; the best pass of
each side counts.

    python bench/extract.py --limit 300 --backbone efficientnet_lite0 --batch-size 64

The ratio printed last is runner time / bare time, measured in the same run (target <= 1.15).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from extract.backbones import create_image_encoder  # noqa: E402
from extract.datasets import ImageDataset, load_split  # noqa: E402
from cache.device import resolve_device  # noqa: E402
from extract.runner import RunOptions, extract_images, limit_split  # noqa: E402
from bench.machine import print_machine  # noqa: E402


def bare_pass(index, encoder, options: RunOptions) -> float:
    """Decode + forward every image once; the outputs are dropped."""
    loader = DataLoader(ImageDataset(index, encoder.transform), batch_size=options.batch_size,
                        num_workers=options.workers, pin_memory=options.cuda)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=options.cuda)
    start = time.perf_counter()
    with torch.inference_mode(), autocast:
        for _, pixels in loader:
            encoder(pixels.to(options.device, non_blocking=True))
    if options.cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def runner_pass(index, encoder, options: RunOptions, out: Path) -> float:
    start = time.perf_counter()
    extract_images(index, encoder, out, options)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-path", type=Path, default=REPO.parent / "shared" / "data" / "f8k")
    parser.add_argument("--images", type=Path,
                        default=REPO.parent / "shared" / "data" / "flickr8k-images")
    parser.add_argument("--dataset", default="f8k")
    parser.add_argument("--split", default="train")
    parser.add_argument("--limit", type=int, default=300, help="first N images of the split")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--weights", default=None)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=2, help="passes per side (best counts)")
    args = parser.parse_args()
    print_machine()
    if not (args.data_path / f"{args.split}_caps.txt").exists():
        sys.exit(f"no data at {args.data_path} (../shared/data/f8k beside the repo); pass "
                 "--data-path and --images")

    index = limit_split(load_split(args.dataset, args.data_path, args.split, args.images),
                        args.limit)
    encoder = create_image_encoder(args.backbone, args.weights)
    options = RunOptions(batch_size=args.batch_size, workers=args.workers,
                         device=resolve_device(args.device), overwrite=True, progress=False)
    encoder.to(options.device)
    n = index.num_images
    for row in range(n):  # warm the page cache: both sides read the same, already cached files
        index.image_file(row).read_bytes()
    bare_pass(limit_split(index, min(n, 2 * args.batch_size)), encoder, options)  # warm-up

    bare, ours = [], []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "image.h5"
        for _ in range(args.repeats):
            bare.append(bare_pass(index, encoder, options))
            ours.append(runner_pass(index, encoder, options, out))
        megabytes = out.stat().st_size / 1e6

    print(f"{n} {args.dataset}/{args.split} images, {args.backbone} on {options.device}, batch "
          f"{args.batch_size}, {args.workers} decoding workers, torch threads "
          f"{torch.get_num_threads()}; best of {args.repeats} passes")
    print(f"{'loop':<44}{'seconds':>10}{'images/s':>10}")
    print(f"{'bare: decode + forward':<44}{min(bare):>10.2f}{n / min(bare):>10.1f}")
    print(f"{'runner: decode + forward + fp16 HDF5 write':<44}{min(ours):>10.2f}"
          f"{n / min(ours):>10.1f}")
    print(f"all passes (s): bare {[round(t, 2) for t in bare]}, runner {[round(t, 2) for t in ours]}")
    print(f"cache written: {megabytes:.0f} MB")
    print(f"ratio runner/bare = {min(ours) / min(bare):.3f} (target <= 1.15)")


if __name__ == "__main__":
    main()
    print_machine("end")
