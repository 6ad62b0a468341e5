"""Stage-one commands: ``cli extract`` (and ``--merge``), ``cli import-precomp``, ``cli demo-data``."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click
import torch

from cache.device import resolve_device
from cache.errors import InputError
from extract import runner
from extract.runner import FileReport, RunOptions, Shard
from extract.views import TRAIN_SPLIT, Views, for_split


def _splits(values: tuple[str, ...]) -> list[str]:
    """``--split`` values: repeatable, each a comma-separated list; order kept, duplicates dropped."""
    out: list[str] = []
    for value in values:
        for name in value.split(","):
            name = name.strip()
            if name and name not in out:
                out.append(name)
    if not out:
        raise InputError("--split: no split named")
    return out


def _echo_file(report: FileReport) -> None:
    """One line per file on stderr as it finishes: written, resumed, kept or merged."""
    kept = " (complete, same settings and rows)" if report.status == "kept" else ""
    click.echo(f"{report.status} {report.path} ({report.rows} rows){kept}", err=True)


def _report(reports: list[FileReport], out: Path, dataset: str, shard: Shard,
            settings: dict[str, Any], name: str = "extract-summary") -> None:
    click.echo(runner.format_summary(reports))
    path = runner.write_summary(reports, Path(out) / dataset, shard, settings, name)
    click.echo(f"summary: {path}")


def _echo_skipped(skipped: list[str], shown: int = 10) -> None:
    """``--skip-missing``: the photos left out (the first ``shown``) and their count, on stderr."""
    for entry in skipped[:shown]:
        click.echo(f"skipped missing photo {entry}", err=True)
    if skipped:
        more = f" ({len(skipped) - shown} more not listed)" if len(skipped) > shown else ""
        click.echo(f"skipped {len(skipped)} missing photo(s){more}", err=True)


def _layers(value: str) -> list[int]:
    """``--layer`` values: one layer, or several comma-separated (order kept)."""
    try:
        layers = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise InputError(f"--layer {value!r}: give a layer number or several, comma-separated "
                         "(6,8,10,-1)") from None
    if not layers:
        raise InputError("--layer: no layer named")
    if len(set(layers)) != len(layers):
        raise InputError(f"--layer {value!r} names a layer twice")
    return layers


def _views(count: int, crop_scale: str, seed: int, backbone: str | None,
           splits: list[str]) -> Views:
    """``--views``, ``--crop-scale``, ``--view-seed``, checked against the call."""
    try:
        low, high = (float(part) for part in crop_scale.split(","))
    except ValueError:
        raise InputError(f"--crop-scale {crop_scale!r}: give LOW,HIGH (0.6,1.0)") from None
    views = Views(count, (low, high), seed)
    if count > 1 and not backbone:
        raise InputError(f"--views {count}: views are augmented photos, and this call extracts no "
                         "image encoder (add --backbone, or drop --views)")
    if count > 1 and TRAIN_SPLIT not in splits:
        raise InputError(f"--views {count}: only the training split ({TRAIN_SPLIT!r}) gets views, "
                         f"and --split names {', '.join(splits)} (dev and test always hold the "
                         "centre view)")
    return views


def _views_summary(views: Views, splits: list[str]) -> str:
    """The summary line saying which split got how many views."""
    others = [split for split in splits if split != TRAIN_SPLIT]
    line = (f"views: {TRAIN_SPLIT} holds {views.count} per photo (view 0 the centre view, "
            f"1..{views.count - 1} augmented: crop scale {views.crop_scale[0]:g}-"
            f"{views.crop_scale[1]:g} + flip, seed {views.seed})")
    if others:
        line += (f"; {', '.join(others)} {'holds' if len(others) == 1 else 'hold'} the centre view "
                 "only")
    return line


def _layer_tags(tag: str, layers: list[int]) -> list[str]:
    """The image file tag of each layer: ``tag`` for one layer; ``<tag>_l<K>`` for several
    (``tag`` itself for the final output, -1)."""
    if len(layers) == 1:
        return [tag]
    return [tag if layer == -1 else f"{tag}_l{layer}" for layer in layers]


@click.command()
@click.option("--backbone", help="Image encoder (dinov2, vit, swin, efficientnet_lite0, "
                                 "efficientnet_lite2, timm).")
@click.option("--weights", help="Image weights: named offline id, local folder/file or hub id. "
                                "timm: a timm model folder (config.json naming the architecture), "
                                "ARCH=FILE (a timm name and a state-dict file) or a timm name.")
@click.option("--layer", "layer_arg", default="-1", show_default=True,
              help="Image encoder layer (-1 = final output; efficientnet_lite0/2, timm: "
                   "K = entry K of timm's feature_info, a stage or a ViT block from 0). Several, "
                   "comma-separated (6,8,10,-1): one pass over the photos writes one cache per "
                   "layer, tagged <tag>_l<K> (-1: <tag>).")
@click.option("--resolution", type=int, help="Input resolution in pixels (default: the encoder's).")
@click.option("--views", type=int, default=1, show_default=True,
              help="Views per photo of the training split (train): the centre view and N-1 "
                   "augmented (RandomResizedCrop + flip); training reads another each epoch. "
                   "Other splits get the centre view.")
@click.option("--crop-scale", default="0.6,1.0", show_default=True,
              help="LOW,HIGH: the RandomResizedCrop scale range of the augmented views.")
@click.option("--view-seed", type=int, default=0, show_default=True,
              help="Seed of the augmented views (drawn per seed, split row and view).")
@click.option("--text-encoder", help="Text encoder (bert, minilm).")
@click.option("--text-weights", help="Text weights: named offline id, local folder or hub id.")
@click.option("--text-layer", type=int, default=-1, show_default=True,
              help="Text encoder layer (-1 = last).")
@click.option("--max-length", type=int, default=128, show_default=True,
              help="Caption tokens kept, [CLS] and [SEP] included.")
@click.option("--dataset", required=True,
              help="f30k, coco, f8k (Karpathy layout: the output folder), or your own captioned "
                   "photos: csv, tsv, jsonl, imagefolder, wds (output folder: --name).")
@click.option("--data-path", "data_paths", multiple=True,
              help="f30k/coco/f8k: folder of {split}_caps.txt, {split}_ids.txt and "
                   "id_mapping.json; csv/tsv/jsonl: the file; imagefolder: the folder; wds: the "
                   "shards (shards/{000000..000099}.tar), or SPLIT=SHARDS once per split.")
@click.option("--images", type=click.Path(file_okay=False),
              help="Root folder the photo paths are relative to (csv/tsv/jsonl default: the "
                   "file's folder).")
@click.option("--split", "split_args", multiple=True, default=("train,dev,test",),
              show_default=True, help="Split(s): repeatable or comma-separated.")
@click.option("--name", help="The output folder under --out, the --dataset of train-head "
                             "(default: f30k/coco/f8k: that name; your own photos: the data "
                             "file's or folder's name).")
@click.option("--image-key", help="Your own photos: the photo path column (default: the first of "
                                  "image, filepath, file_name, image_path, file, path).")
@click.option("--caption-key", help="Your own photos: the caption column (default: the first of "
                                    "caption, text, title, captions).")
@click.option("--split-ratio", help="Your own photos without a split column: train,dev,test "
                                    "fractions of the photos (default 0.8,0.1,0.1).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Your own photos: the seed of the --split-ratio hash.")
@click.option("--skip-missing", is_flag=True,
              help="Your own photos: leave out photos that do not exist (listed and counted) "
                   "instead of stopping.")
@click.option("--out", default="features", show_default=True, type=click.Path(file_okay=False),
              help="Output root: <out>/<dataset>/<split>/<modality>-<tag>.h5.")
@click.option("--tag", help="Image file tag (default: the backbone name).")
@click.option("--text-tag", help="Text file tag (default: the text encoder name).")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--workers", type=int, default=min(4, os.cpu_count() or 1), show_default=True,
              help="DataLoader image decoding workers (0 = decode in the main process).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:index].")
@click.option("--threads", type=int,
              help="Torch CPU threads of the main process (default: torch's, one per core).")
@click.option("--limit", type=int, help="Only the first N images of each split and their captions.")
@click.option("--overwrite", is_flag=True,
              help="Replace complete files (of the same or of other settings) and discard partial "
                   "ones.")
@click.option("--skip-existing", is_flag=True,
              help="Kept for old scripts, changes nothing: a complete file with the same settings "
                   "and rows is always kept, one with other settings always stops the command.")
@click.option("--rank", type=int, help="This process's shard (default: $RANK under torchrun).")
@click.option("--world-size", type=int, help="Number of shards (default: $WORLD_SIZE).")
@click.option("--merge", is_flag=True,
              help="Join the finished shard files of a sharded run into normal cache files.")
def extract(backbone: str | None, weights: str | None, layer_arg: str, resolution: int | None,
            views: int, crop_scale: str, view_seed: int, text_encoder: str | None,
            text_weights: str | None, text_layer: int, max_length: int,
            dataset: str, data_paths: tuple[str, ...], images: str | None,
            split_args: tuple[str, ...], name: str | None, image_key: str | None,
            caption_key: str | None, split_ratio: str | None, seed: int, skip_missing: bool,
            out: str, tag: str | None, text_tag: str | None, batch_size: int, workers: int,
            device: str, threads: int | None, limit: int | None, overwrite: bool,
            skip_existing: bool,
            rank: int | None,
            world_size: int | None, merge: bool) -> None:
    """Run frozen encoders once over a dataset and write their token features to HDF5 caches.

    \b
    cli extract --backbone efficientnet_lite0 --text-encoder minilm --dataset f8k \\
        --data-path ../shared/data/f8k --images ../shared/data/flickr8k-images --split test
    cli extract --backbone efficientnet_lite0 --text-encoder minilm --dataset csv \\
        --data-path mine/captions.csv --images mine/photos      # -> features/captions/...
    Sharded over several GPUs or machines: run the same command under torchrun (or with
    --rank R --world-size W on each machine); every rank writes
    <modality>-<tag>.shard-R-of-W.h5; then run the same command once more with --merge.
    An interrupted run resumes when the same command is run again: complete files with the same
    settings and rows are kept, a partial file continues from its last committed row.
    With --views N the training split's image caches hold N views per photo (tag them apart:
    --tag efficientnet_lite0_v4).
    """
    from backbones.registry import (create_image_encoders, create_text_encoder,
                                    list_image_encoders, list_text_encoders)
    from extract.captioned import TableOptions, parse_ratio
    from extract.formats import DatasetRequest, dataset_format

    splits = _splits(split_args)
    fmt = dataset_format(dataset)
    request = DatasetRequest(
        data_paths=data_paths, splits=splits, images=images, need_photos=bool(backbone),
        name=name, table=TableOptions(image_key, caption_key,
                                      parse_ratio(split_ratio) if split_ratio else None, seed,
                                      skip_missing))
    if not backbone and not text_encoder:
        raise InputError("name an image encoder (--backbone), a text encoder (--text-encoder) "
                         "or both")
    if backbone and backbone not in list_image_encoders():
        raise InputError(f"unknown image encoder {backbone!r}; available: "
                         f"{', '.join(list_image_encoders())}")
    if text_encoder and text_encoder not in list_text_encoders():
        raise InputError(f"unknown text encoder {text_encoder!r}; available: "
                         f"{', '.join(list_text_encoders())}")
    if threads is not None and threads < 1:
        raise InputError(f"--threads must be >= 1, got {threads}")
    if overwrite and skip_existing:
        raise InputError("--overwrite and --skip-existing exclude each other")
    layers = _layers(layer_arg)
    view_options = _views(views, crop_scale, view_seed, backbone, splits)
    if not data_paths and not merge:
        raise InputError("--data-path is required (the folder of {split}_caps.txt, or your "
                         "captions file, imagefolder or shards)")
    folder = fmt.name(dataset, request)
    image_tags = _layer_tags(tag or backbone, layers) if backbone else []
    targets = {split: {"image": [runner.output_path(out, folder, split, "image", t)
                                 for t in image_tags],
                       "text": [runner.output_path(out, folder, split, "text",
                                                   text_tag or text_encoder)]
                       if text_encoder else []}
               for split in splits}
    settings = {"backbone": backbone, "weights": weights,
                "layer": layers[0] if len(layers) == 1 else layers,
                "resolution": resolution, "text_encoder": text_encoder,
                "text_weights": text_weights, "text_layer": text_layer, "max_length": max_length,
                "dataset": dataset, "name": folder, "data_path": list(data_paths), "images": images,
                "splits": splits, "split_ratio": split_ratio, "seed": seed,
                "skip_missing": skip_missing,
                "batch_size": batch_size, "workers": workers, "device": device,
                "threads": threads, "limit": limit, "views": views,
                "crop_scale": list(view_options.crop_scale), "view_seed": view_seed,
                "merge": merge}
    if merge:
        reports = [runner.merge_split_shards(path, overwrite)
                   for split in splits for paths in targets[split].values() for path in paths]
        _report(reports, Path(out), folder, Shard(), settings, "merge-summary")
        return

    shard = runner.shard_from_env(rank, world_size)
    if threads is not None:
        torch.set_num_threads(threads)
    options = RunOptions(batch_size=batch_size, workers=workers, device=resolve_device(device),
                         overwrite=overwrite)
    loaded = fmt.load(dataset, request)
    _echo_skipped(loaded.skipped)
    indexes = {split: runner.limit_split(index, limit) for split, index in loaded.indexes.items()}
    image_encoders = (create_image_encoders(backbone, weights, layers, resolution)
                      if backbone else [])
    text_model = (create_text_encoder(text_encoder, text_weights, text_layer, max_length)
                  if text_encoder else None)
    if not overwrite:  # a complete file of other settings anywhere stops the command before any work
        for split in splits:
            for encoder, path in zip(image_encoders, targets[split]["image"]):
                runner.is_done("image", indexes[split], encoder, path, shard,
                               for_split(view_options, split))
            for path in targets[split]["text"]:
                runner.is_done("text", indexes[split], text_model, path, shard)
    reports = []
    for split in splits:
        if image_encoders:
            done = runner.extract_image_layers(indexes[split], image_encoders,
                                               targets[split]["image"], options, shard,
                                               for_split(view_options, split))
            for report in done:
                reports.append(report)
                _echo_file(report)
        for path in targets[split]["text"]:
            reports.append(runner.extract_texts(indexes[split], text_model, path, options, shard))
            _echo_file(reports[-1])
    _report(reports, Path(out), folder, shard, settings)
    if view_options.count > 1:
        click.echo(_views_summary(view_options, splits))
    if shard.sharded:
        click.echo("shards written; when every rank has finished, join them with the same "
                   "command plus --merge")


@click.command("import-precomp")
@click.option("--format", "fmt", type=click.Choice(["scan", "teran"]), default="scan",
              show_default=True, help="scan: {split}_ims.npy; teran: one <id>.npz per image.")
@click.option("--dataset", required=True, help="Dataset name (f30k, coco, f8k): the output folder.")
@click.option("--data-path", required=True, type=click.Path(file_okay=False),
              help="Folder of {split}_caps.txt and {split}_ids.txt (and {split}_ims.npy for scan).")
@click.option("--split", "split_args", multiple=True, default=("train,dev,test",),
              show_default=True, help="Split(s): repeatable or comma-separated.")
@click.option("--features", type=click.Path(),
              help="scan: the .npy file (default <data-path>/{split}_ims.npy; '{split}' is "
                   "replaced); teran: the folder of <id>.npz files (required).")
@click.option("--boxes", type=click.Path(file_okay=False),
              help="teran: folder of <id>.npy boxes (needs --images for the image sizes).")
@click.option("--images", type=click.Path(file_okay=False),
              help="Image root (only to read image sizes for --boxes).")
@click.option("--tag", default="butd", show_default=True, help="File tag: image-<tag>.h5.")
@click.option("--out", default="features", show_default=True, type=click.Path(file_okay=False))
@click.option("--limit", type=int, help="Only the first N images of each split.")
@click.option("--overwrite", is_flag=True,
              help="Replace complete files and discard partial ones (without it, a complete file "
                   "of the same import is kept and one of another import stops the command).")
def import_precomp(fmt: str, dataset: str, data_path: str, split_args: tuple[str, ...],
                   features: str | None, boxes: str | None, images: str | None, tag: str,
                   out: str, limit: int | None, overwrite: bool) -> None:
    """Import precomputed region features (SCAN .npy or TERAN .npz) as image caches.

    The text side comes from `cli extract --text-encoder ...` over the same caption folder.
    """
    from extract.datasets import load_split
    from extract.precomp import import_scan, import_teran

    reports = []
    for split in _splits(split_args):
        path = runner.output_path(out, dataset, split, "image", tag)
        caps = Path(data_path) / f"{split}_caps.txt"
        if fmt == "scan":
            npy = Path((features or str(Path(data_path) / "{split}_ims.npy")).replace("{split}",
                                                                                    split))
            index = load_split(dataset, data_path, split)
            reports.append(import_scan(index, npy, caps, path, tag, overwrite, limit))
        else:
            if features is None:
                raise InputError("--features is required with --format teran (the folder of "
                                 "<id>.npz files)")
            index = runner.limit_split(load_split(dataset, data_path, split,
                                                  images if boxes else None), limit)
            reports.append(import_teran(index, Path(features.replace("{split}", split)), path, tag,
                                        Path(boxes) if boxes else None, overwrite))
    settings = {"format": fmt, "dataset": dataset, "data_path": data_path, "features": features,
                "boxes": boxes, "tag": tag, "limit": limit}
    _report(reports, Path(out), dataset, Shard(), settings, "import-summary")


@click.command("demo-data")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--count", type=int, default=1200, show_default=True, help="Number of images.")
@click.option("--size", type=int, default=224, show_default=True, help="Image side in pixels.")
@click.option("--seed", type=int, default=0, show_default=True)
def demo_data(directory: str, count: int, size: int, seed: int) -> None:
    """Render a small learnable caption set (coloured shapes) in the Flickr30K layout."""
    from extract.demo_data import generate_demo_data

    sizes = generate_demo_data(directory, count, size, seed)
    click.echo(f"{directory}: " + ", ".join(f"{split} {n} images" for split, n in sizes.items())
               + " (5 captions each)")
