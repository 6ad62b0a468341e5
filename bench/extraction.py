"""Benchmark: the full extraction runner vs a bare decode + forward loop, same images, same model.

Both sides decode the same JPEGs with the same ``ImageDataset`` / DataLoader workers and batch size
and run the same frozen encoder under ``torch.inference_mode``; the runner also copies the tokens
to the host as fp16, writes them to HDF5 and commits the row count after every batch. Passes
alternate (bare, runner, bare, runner, ...) after one warm-up pass over the files; the best pass of
each side counts.

    python bench/extraction.py --limit 300 --backbone efficientnet_lite0 --batch-size 64

The ratio printed last is runner time / bare time, measured in the same run (target <= 1.15).
With ``--layers 6,8,10,-1`` it measures instead one pass writing the caches of those layers
(``cli extract --layer 6,8,10,-1``) against one runner call per layer, alternating likewise:

    python bench/extraction.py --backbone dinov2 --weights imgfocus-dinov2-s14 --layers 6,8,10,-1
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

from extract.backbones import create_image_encoder, create_image_encoders
from extract.datasets import ImageDataset, load_split
from cache.device import resolve_device
from extract.runner import (RunOptions, extract_image_layers, extract_images,
                           limit_split)
from machine import print_machine

REPO = Path(__file__).resolve().parents[1]


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


def layers_pass(index, encoders, options: RunOptions, folder: Path) -> float:
    """One pass writing the cache of every encoder (layer)."""
    start = time.perf_counter()
    extract_image_layers(index, encoders, [folder / f"layer{i}.h5" for i in range(len(encoders))],
                         options)
    return time.perf_counter() - start


def per_layer_passes(index, encoders, options: RunOptions, folder: Path) -> float:
    """One runner call per encoder (layer), as separate ``cli extract --layer K`` calls do."""
    start = time.perf_counter()
    for i, encoder in enumerate(encoders):
        extract_images(index, encoder, folder / f"single{i}.h5", options)
    return time.perf_counter() - start


def compare_layers(index, args, options: RunOptions) -> None:
    """Print one pass over several layers against one pass per layer."""
    layers = [int(k) for k in args.layers.split(",")]
    encoders = create_image_encoders(args.backbone, args.weights, layers)
    for encoder in encoders:
        encoder.to(options.device)
    together, apart = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            apart.append(per_layer_passes(index, encoders, options, Path(tmp)))
            together.append(layers_pass(index, encoders, options, Path(tmp)))
    n = index.num_images
    print(f"{n} {args.dataset}/{args.split} images, {args.backbone} layers {layers} on "
          f"{options.device}, batch {args.batch_size}, {args.workers} decoding workers, torch "
          f"threads {torch.get_num_threads()}; best of {args.repeats}")
    print(f"{'loop':<44}{'seconds':>10}{'images/s':>10}")
    print(f"{'one runner call per layer':<44}{min(apart):>10.2f}{n / min(apart):>10.1f}")
    print(f"{'one pass over every layer':<44}{min(together):>10.2f}{n / min(together):>10.1f}")
    print(f"all passes (s): per layer {[round(t, 2) for t in apart]}, one pass "
          f"{[round(t, 2) for t in together]}")
    print(f"ratio one pass / per layer = {min(together) / min(apart):.3f}")


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
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=2, help="passes per side (best counts)")
    parser.add_argument("--layers", help="comma-separated layers: one pass over all of them vs "
                                         "one runner call per layer")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print_machine()
    if not (args.data_path / f"{args.split}_caps.txt").exists():
        sys.exit(f"no data at {args.data_path} (../shared/data/f8k beside the repo); pass "
                 "--data-path and --images")

    index = limit_split(load_split(args.dataset, args.data_path, args.split, args.images),
                        args.limit)
    options = RunOptions(batch_size=args.batch_size, workers=args.workers,
                         device=resolve_device(args.device), overwrite=True, progress=False)
    if args.layers:
        compare_layers(index, args, options)
        return
    encoder = create_image_encoder(args.backbone, args.weights)
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
