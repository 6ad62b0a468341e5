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

With ``--views N`` it measures a runner pass writing N views per photo (``cli extract --views N``:
the centre view and N - 1 seeded RandomResizedCrop + flip draws) against a one-view runner pass,
alternating likewise; the ratio printed last is views time / one-view time (N is the cost of
running the backbone on every view; above it, the augmentation's decoding cost):

    python bench/extraction.py --backbone efficientnet_lite0 --views 4

With ``--formats f8k,csv,wds`` it measures instead the same photos read from each dataset format:
the limited split is first written (not timed) into a temp folder as the f8k layout, as a CSV
(``image,caption,split``) and as WebDataset shards (``--per-shard`` photos each); then passes
alternate over the formats, each pass reading the format as ``cli extract`` does (parse, check every
photo or scan every shard) and writing the image cache; the best pass per format counts and the
rows/s ratio of each format against f8k is printed:

    python bench/extraction.py --limit 1000 --formats f8k,csv,wds
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from backbones.registry import create_image_encoder, create_image_encoders
from cache.device import resolve_device
from extract.captioned import write_csv
from extract.datasets import MAPPING_FILE, ImageDataset, SplitIndex, load_split
from extract.formats import DatasetRequest, dataset_format
from extract.runner import (RunOptions, extract_image_layers, extract_images,
                            limit_split)
from extract.views import Views
from extract.wds import write_shards
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


def compare_views(index, args, options: RunOptions) -> None:
    """Print a runner pass of ``args.views`` views per photo against a one-view pass."""
    encoder = create_image_encoder(args.backbone, args.weights).to(options.device)
    views = Views(args.views)
    one, several = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            one.append(runner_pass(index, encoder, options, Path(tmp) / "one.h5"))
            start = time.perf_counter()
            extract_images(index, encoder, Path(tmp) / "views.h5", options, views=views)
            several.append(time.perf_counter() - start)
    n = index.num_images
    print(f"{n} {args.dataset}/{args.split} images, {args.backbone} on {options.device}, batch "
          f"{args.batch_size}, {args.workers} decoding workers, torch threads "
          f"{torch.get_num_threads()}; best of {args.repeats}")
    print(f"{'loop':<44}{'seconds':>10}{'images/s':>10}")
    print(f"{'runner, one view':<44}{min(one):>10.2f}{n / min(one):>10.1f}")
    print(f"{f'runner, {args.views} views':<44}{min(several):>10.2f}{n / min(several):>10.1f}")
    print(f"all passes (s): one view {[round(t, 2) for t in one]}, {args.views} views "
          f"{[round(t, 2) for t in several]}")
    print(f"ratio {args.views} views / one view = {min(several) / min(one):.3f}")
def write_karpathy(index: SplitIndex, folder: Path) -> Path:
    """The split in the f8k layout ({split}_caps.txt, {split}_ids.txt, id_mapping.json)."""
    folder.mkdir(parents=True, exist_ok=True)
    ids = [index.image_ids[int(row)] for row in index.caption_image_index]
    (folder / f"{index.split}_caps.txt").write_text("\n".join(index.captions) + "\n", "utf-8")
    (folder / f"{index.split}_ids.txt").write_text("\n".join(ids) + "\n", "utf-8")
    mapping = dict(zip(index.image_ids, index.image_paths))
    (folder / MAPPING_FILE).write_text(json.dumps(mapping), "utf-8")
    return folder


def format_requests(index: SplitIndex, args, tmp: Path) -> dict[str, tuple[str, DatasetRequest]]:
    """``--dataset`` value and request of each format of ``--formats``, written into ``tmp``."""
    split, root = index.split, str(index.images_root)
    writers = {
        "f8k": lambda: (args.dataset, DatasetRequest(
            (str(write_karpathy(index, tmp / "f8k")),), [split], root)),
        "csv": lambda: ("csv", DatasetRequest((str(write_csv(index, tmp / "pairs.csv")),),
                                              [split], root)),
        "wds": lambda: ("wds", DatasetRequest(
            (f"{split}={write_shards(index, tmp / 'shards', args.per_shard)}",), [split])),
    }
    names = [name.strip() for name in args.formats.split(",")]
    unknown = [name for name in names if name not in writers]
    if unknown or "f8k" not in names:
        sys.exit(f"--formats {args.formats!r}: choose among {', '.join(writers)}, f8k included")
    return {name: writers[name]() for name in names}


def format_pass(dataset: str, request: DatasetRequest, encoder, options: RunOptions,
                out: Path) -> tuple[float, int]:
    """Read a format as ``cli extract`` does and write its image cache: (seconds, rows)."""
    start = time.perf_counter()
    index = dataset_format(dataset).load(dataset, request).indexes[request.splits[0]]
    extract_images(index, encoder, out, options)
    return time.perf_counter() - start, index.num_images


def compare_formats(index: SplitIndex, args, options: RunOptions) -> None:
    """Print the rows/s of the same photos read as each of ``--formats`` and the ratio to f8k."""
    encoder = create_image_encoder(args.backbone, args.weights)
    encoder.to(options.device)
    seconds: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        began = time.perf_counter()
        requests = format_requests(index, args, Path(tmp))
        written = time.perf_counter() - began
        shards_mb = sum(p.stat().st_size for p in Path(tmp).glob("shards/*.tar")) / 1e6
        for name, (dataset, request) in requests.items():  # warm-up: page cache, workers
            format_pass(dataset, request, encoder, options, Path(tmp) / f"warm-{name}.h5")
        for _ in range(args.repeats):
            for name, (dataset, request) in requests.items():
                took, rows = format_pass(dataset, request, encoder, options,
                                         Path(tmp) / f"{name}.h5")
                seconds.setdefault(name, []).append(took)
    n = index.num_images
    print(f"{n} {args.dataset}/{args.split} photos, {args.backbone} on {options.device}, batch "
          f"{args.batch_size}, {args.workers} decoding workers, torch threads "
          f"{torch.get_num_threads()}; best of {args.repeats} passes per format; formats written "
          f"in {written:.1f} s (not timed), shards {shards_mb:.0f} MB of {args.per_shard} photos")
    print(f"{'format':<10}{'seconds':>10}{'rows/s':>10}{'vs f8k':>10}")
    base = n / min(seconds["f8k"])
    for name, times in seconds.items():
        rate = n / min(times)
        print(f"{name:<10}{min(times):>10.2f}{rate:>10.1f}{rate / base:>10.3f}")
    print("all passes (s): " + ", ".join(f"{name} {[round(t, 2) for t in times]}"
                                         for name, times in seconds.items()))
    print("ratio rows/s vs f8k: " + ", ".join(f"{name} {n / min(times) / base:.3f}"
                                              for name, times in seconds.items()))


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
    parser.add_argument("--views", type=int, help="views per photo: a --views N runner pass vs a "
                                                  "one-view runner pass")
    parser.add_argument("--formats", help="comma-separated dataset formats (f8k,csv,wds): the same "
                                          "photos read from each, rows/s against f8k")
    parser.add_argument("--per-shard", type=int, default=250,
                        help="photos per WebDataset shard (--formats)")
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
    if args.views:
        compare_views(index, args, options)
        return
    if args.formats:
        compare_formats(index, args, options)
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
