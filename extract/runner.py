"""The extraction loop: decode -> forward -> write, resumable, shardable over ranks.

One call of `extract_images` / `extract_texts` writes one cache file (one split, one modality, one
encoder) through `cache.store`'s writers; `extract_image_layers` writes the caches of several layers
of one backbone from one pass over the photos:

* images are decoded in DataLoader workers (``ImageDataset``), batched, run through the frozen
  encoder under ``torch.inference_mode`` (bf16 autocast on CUDA, pinned memory and non-blocking copies)
  and written one batch per HDF5 write, the row count committed after each batch;
* captions are tokenised up front (so the ragged layout is known before the first write) and run in
  batches of consecutive rows;
* a rerun after an interruption continues from the committed row count; with the same batch size the
  batches are the same as in an uninterrupted run, so the file is bit-identical on CPU;
* a complete file of exactly this work (same identity attributes, same image ids or captions) is
  kept untouched (`keep_existing`), so rerunning a killed multi-file call finishes the files it had
  not finished; a complete file of other work is refused unless ``overwrite``;
* with ``world_size > 1`` each rank writes the contiguous block of rows `Shard.bounds` gives it into its
  own shard file; `merge_split_shards` joins the shards into the normal file afterwards.

On CUDA the device-to-host copy of batch ``i`` overlaps the forward pass of batch ``i + 1``
(`_ToHost`), so the GPU does not wait for the HDF5 write.
"""
from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import re
import time
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from backbones.encoders import ImageEncoder, TextEncoder
from cache.errors import InputError
from cache.progress import progress_bar
from cache.store import (CacheAttrs, ImageCache, ImageCacheWriter, TextCache, TextCacheWriter,
                         default_cache_path, merge_shards, open_cache, photo_folder_extra,
                         unsharded)
from extract.datasets import ImageDataset, SplitIndex
from extract.views import ViewImages, Views


# ------------------------------------------------------------------------------------------ options


@dataclass(frozen=True)
class Shard:
    """This process's part of a sharded extraction: rank ``rank`` of ``world_size``."""

    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise InputError(f"rank {self.rank} is not in 0..{self.world_size - 1} "
                             f"(world size {self.world_size})")

    @property
    def sharded(self) -> bool:
        return self.world_size > 1

    def bounds(self, num_items: int) -> tuple[int, int]:
        """The contiguous block ``[start, stop)`` of ``num_items`` rows this rank writes."""
        return (num_items * self.rank // self.world_size,
                num_items * (self.rank + 1) // self.world_size)

    def path(self, final: Path) -> Path:
        """Where this rank writes: the final path itself, or ``<stem>.shard-R-of-W.h5``."""
        if not self.sharded:
            return final
        return final.with_name(f"{final.stem}.shard-{self.rank:04d}-of-{self.world_size:04d}"
                               f"{final.suffix}")

    def attrs(self, attrs: CacheAttrs) -> CacheAttrs:
        """The attributes of this rank's file (a shard records its row range and the total)."""
        if not self.sharded:
            return attrs
        start, stop = self.bounds(attrs.num_items)
        return dataclasses.replace(attrs, num_items=stop - start, shard_start=start,
                                   shard_stop=stop, total_items=attrs.num_items)

    @property
    def summary_suffix(self) -> str:
        return f".rank-{self.rank:04d}-of-{self.world_size:04d}" if self.sharded else ""


def shard_from_env(rank: int | None = None, world_size: int | None = None) -> Shard:
    """The shard of this process: explicit values, else torchrun's RANK / WORLD_SIZE, else 0 of 1."""
    if (rank is None) != (world_size is None):
        raise InputError("--rank and --world-size go together")
    if rank is None:
        rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    return Shard(rank, world_size)


@dataclass(frozen=True)
class RunOptions:
    """How to run: batch size, decoding workers, device, what to do with existing files.

    A complete file of the same work is kept, one of other work is an error; ``overwrite`` replaces
    complete files (kept or not) and discards partial ones.
    """

    batch_size: int = 64
    workers: int = min(4, os.cpu_count() or 1)
    device: torch.device = torch.device("cpu")
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise InputError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.workers < 0:
            raise InputError(f"--workers must be >= 0, got {self.workers}")

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


@dataclass
class FileReport:
    """What one extraction (or merge) wrote: for the summary table and JSON."""

    path: Path
    modality: str
    split: str
    rows: int
    resumed_from: int
    seconds: float
    status: str = "written"
    views: int = 1

    @property
    def items_per_s(self) -> float:
        return (self.rows - self.resumed_from) / self.seconds if self.seconds > 0 else 0.0

    @property
    def megabytes(self) -> float:
        return self.path.stat().st_size / 1e6 if self.path.exists() else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"file": str(self.path), "modality": self.modality, "split": self.split,
                "status": self.status, "rows": self.rows, "resumed_from": self.resumed_from,
                "seconds": round(self.seconds, 3), "items_per_s": round(self.items_per_s, 1),
                "megabytes": round(self.megabytes, 2), "views": self.views}


# ------------------------------------------------------------------------------------------ splits


def limit_split(index: SplitIndex, limit: int | None) -> SplitIndex:
    """The first ``limit`` images of a split and their captions (None: the whole split)."""
    if limit is None or limit >= index.num_images:
        return index
    if limit < 1:
        raise InputError(f"--limit must be >= 1, got {limit}")
    keep = np.flatnonzero(index.caption_image_index < limit)
    return dataclasses.replace(
        index, image_ids=index.image_ids[:limit],
        image_paths=None if index.image_paths is None else index.image_paths[:limit],
        captions=[index.captions[i] for i in keep],
        caption_image_index=index.caption_image_index[keep])


def image_attrs(encoder: ImageEncoder, index: SplitIndex, views: Views = Views()) -> CacheAttrs:
    """Cache attributes of an image encoder's features over a whole split (``views`` per photo)."""
    layout = encoder.layout
    return CacheAttrs(modality="image", encoder=encoder.name, weights_id=encoder.weights_id,
                      weights_hash=encoder.weights_hash, weights_note=encoder.weights_note,
                      dim=layout.dim, num_items=index.num_images, layer=encoder.layer,
                      num_tokens=layout.num_tokens, prefix_tokens=layout.prefix_tokens,
                      grid=layout.grid, resolution=encoder.resolution,
                      preprocessing=encoder.preprocessing, dataset=index.dataset, split=index.split,
                      extra=photo_folder_extra(index.images_root), views=views.count,
                      augmentation=views.record())


def text_attrs(encoder: TextEncoder, index: SplitIndex) -> CacheAttrs:
    """Cache attributes of a text encoder's token states over a whole split ([CLS]/[SEP] counted)."""
    tokenizer = encoder.tokenizer
    preprocessing = {"tokenizer": type(tokenizer).__name__, "vocab_size": len(tokenizer),
                     "lowercase": bool(getattr(tokenizer, "do_lower_case", False)),
                     "max_length": encoder.max_length, "truncation": True,
                     "special_tokens": ["[CLS]", "[SEP]"]}
    return CacheAttrs(modality="text", encoder=encoder.name, weights_id=encoder.weights_id,
                      weights_hash=encoder.weights_hash, weights_note=encoder.weights_note,
                      dim=encoder.dim, num_items=index.num_captions, layer=encoder.layer,
                      num_tokens=encoder.max_length, prefix_tokens=1, suffix_tokens=1,
                      preprocessing=preprocessing, dataset=index.dataset, split=index.split)


def _row_keys(cache: ImageCache | TextCache) -> list[str]:
    """What a cache's rows are: its image ids, or its captions."""
    return cache.ids if isinstance(cache, ImageCache) else cache.captions


def keep_existing(path: Path, attrs: CacheAttrs, rows: Sequence[str]) -> bool:
    """Whether a complete cache at ``path`` already holds exactly this work: the same identity
    attributes (`CacheAttrs.IDENTITY`) and the same rows (image ids, or captions, in order).

    False if there is no file. InputError naming the file and every difference if it holds other
    work (``--overwrite`` replaces it).
    """
    if not path.exists():
        return False
    try:
        existing = open_cache(path)
    except InputError:
        raise InputError(f"{path}: a file that is not a valid cache is in the way; pass "
                         "--overwrite to replace it") from None
    diff = existing.attrs.identity_diff(attrs)
    if not diff:
        have = _row_keys(existing)
        first = next((i for i, (a, b) in enumerate(zip(have, rows)) if a != b), None)
        if first is not None:
            what = "image ids" if attrs.modality == "image" else "captions"
            diff = [f"{what} differ from row {first}: {have[first]!r} != {rows[first]!r}"]
    if diff:
        raise InputError(f"{path}: a complete cache from a different extraction exists (file != "
                         f"this call: {'; '.join(diff)}); pass --overwrite to replace it or --tag "
                         "to write beside it")
    return True


def _target(modality: str, index: SplitIndex, encoder: ImageEncoder | TextEncoder, path: Path,
            shard: Shard, views: Views = Views()) -> tuple[Path, CacheAttrs, list[str]]:
    """This rank's file of ``path``, its attributes and its rows (image ids, or captions)."""
    whole = (image_attrs(encoder, index, views) if modality == "image"
             else text_attrs(encoder, index))
    start, stop = shard.bounds(whole.num_items)
    rows = index.image_ids if modality == "image" else index.captions
    return shard.path(path), shard.attrs(whole), list(rows[start:stop])


def is_done(modality: str, index: SplitIndex, encoder: ImageEncoder | TextEncoder, path: Path,
            shard: Shard = Shard(), views: Views = Views()) -> bool:
    """`keep_existing` for this rank's file of ``path``: call it for every file of a command before
    any work, so that a file of other work stops the command early."""
    return keep_existing(*_target(modality, index, encoder, path, shard, views))


def kept_report(path: Path, attrs: CacheAttrs) -> FileReport:
    """The report of a complete file of the same work, left as it is."""
    return FileReport(path, attrs.modality, attrs.split, attrs.num_items, attrs.num_items, 0.0,
                      "kept", attrs.views)


# ------------------------------------------------------------------------------------------ loops


class _ToHost:
    """Hands device outputs to the host as fp16 NumPy arrays.

    On CUDA the copy goes into one of two reusable pinned buffers with ``non_blocking=True`` and the
    array is handed out one step later, so the device computes the next batch meanwhile. On CPU an
    array is handed out at once.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.buffers: list[torch.Tensor | None] = [None, None]
        self.turn = 0
        self.pending: tuple[torch.cuda.Event, np.ndarray, Any] | None = None

    def push(self, out: torch.Tensor, meta: Any) -> Iterator[tuple[np.ndarray, Any]]:
        """Queue ``out`` (with ``meta``); yield what is ready on the host."""
        out = out.to(torch.float16)
        if not self.cuda:
            yield out.numpy(), meta
            return
        buffer = self.buffers[self.turn]
        if buffer is None or buffer.numel() < out.numel():
            buffer = torch.empty(out.numel(), dtype=torch.float16, pin_memory=True)
            self.buffers[self.turn] = buffer
        host = buffer[:out.numel()].view(out.shape)
        host.copy_(out, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self.turn = 1 - self.turn
        yield from self.flush()
        self.pending = (event, host.numpy(), meta)

    def flush(self) -> Iterator[tuple[np.ndarray, Any]]:
        """Yield the last queued output once its copy has finished."""
        if self.pending is not None:
            event, array, meta = self.pending
            self.pending = None
            event.synchronize()
            yield array, meta


def _autocast(options: RunOptions) -> Any:
    return (torch.autocast("cuda", dtype=torch.bfloat16) if options.cuda else nullcontext())


def _progress(options: RunOptions, path: Path, total: int, done: int, unit: str) -> tqdm:
    """A redrawn bar on a terminal; plain lines (at most every 30 s) under nohup or in a log."""
    return progress_bar(total=total, initial=done, unit=unit, desc=path.name,
                        disable=not options.progress, leave=False)


def extract_images(index: SplitIndex, encoder: ImageEncoder, path: Path, options: RunOptions,
                   shard: Shard = Shard(), views: Views = Views()) -> FileReport:
    """Write (or resume, or keep: `keep_existing`) the image cache of a split (this rank's shard of
    it) at ``path``, ``views`` per photo."""
    (report,) = extract_image_layers(index, [encoder], [path], options, shard, views)
    return report


def check_shared_backbone(encoders: Sequence[ImageEncoder]) -> None:
    """InputError unless ``encoders`` are one backbone (name, weights, resolution), as one pass
    over several layers needs."""
    first = encoders[0]
    for other in encoders[1:]:
        same = (other.name, other.weights_hash, other.resolution) == (
            first.name, first.weights_hash, first.resolution)
        if not same:
            raise InputError(f"one pass over several layers needs one backbone: {other.name} "
                             f"{other.weights_id} at {other.resolution} px differs from "
                             f"{first.name} {first.weights_id} at {first.resolution} px")


def extract_image_layers(index: SplitIndex, encoders: Sequence[ImageEncoder], paths: Sequence[Path],
                         options: RunOptions, shard: Shard = Shard(),
                         views: Views = Views()) -> list[FileReport]:
    """Write the image caches of several layers of one backbone in one pass over the photos: the
    cache of ``encoders[i]`` (layer ``encoders[i].layer``) at ``paths[i]``, ``views`` per photo
    (`extract.views`; the backbone runs on every view, ``batch_size`` photos at a time).

    Each file is kept, resumed or written on its own terms (`keep_existing`); the pass starts at the
    lowest committed row of the unfinished files and a file already further on skips the rows it
    has. The first encoder runs the backbone once per batch (`ImageEncoder.forward_layers`).
    """
    check_shared_backbone(encoders)
    targets = [_target("image", index, encoder, path, shard, views)
               for encoder, path in zip(encoders, paths)]
    reports: dict[int, FileReport] = {}
    todo = []
    for i, (target, attrs, ids) in enumerate(targets):
        if not options.overwrite and keep_existing(target, attrs, ids):
            reports[i] = kept_report(target, attrs)
        else:
            todo.append(i)
    if todo:
        if index.image_paths is None:
            raise InputError(f"{index.dataset}/{index.split}: image paths unknown (needs "
                             "id_mapping.json beside the caption files and --images)")
        for i, report in zip(todo, _write_image_layers(index, [encoders[i] for i in todo],
                                                       [targets[i] for i in todo], options,
                                                       shard, views)):
            reports[i] = report
    return [reports[i] for i in range(len(targets))]


def _write_image_layers(index: SplitIndex, encoders: Sequence[ImageEncoder],
                        targets: Sequence[tuple[Path, CacheAttrs, list[str]]], options: RunOptions,
                        shard: Shard, views: Views) -> list[FileReport]:
    start, stop = shard.bounds(index.num_images)
    rel_paths = index.image_paths[start:stop]
    began = time.perf_counter()
    with ExitStack() as stack:
        writers = [stack.enter_context(ImageCacheWriter(target, attrs, ids, rel_paths,
                                                        overwrite=options.overwrite))
                   for target, attrs, ids in targets]
        resumed = [writer.rows_written for writer in writers]
        done = min(resumed)
        photos = (ViewImages(index, encoders[0].transform, views) if views.count > 1
                  else ImageDataset(index, encoders[0].transform))
        dataset = Subset(photos, range(start + done, stop))
        loader = DataLoader(dataset, batch_size=options.batch_size, num_workers=options.workers,
                            pin_memory=options.cuda, shuffle=False)
        to_host = _ToHost(options.device)
        first = encoders[0].to(options.device)
        with _progress(options, targets[0][0], stop - start, done, "img") as bar, \
                torch.inference_mode(), _autocast(options):
            def write(tokens: np.ndarray, meta: tuple[torch.Tensor, int]) -> None:
                rows, which = meta
                writer = writers[which]
                skip = start + writer.rows_written - int(rows[0])
                if not 0 <= skip <= len(tokens):
                    raise RuntimeError(f"batch starts at row {int(rows[0])}, expected "
                                       f"{start + writer.rows_written}")
                if skip < len(tokens):
                    if views.count > 1:      # [B, V, T, D]: the centre view, then the others
                        writer.append(tokens[skip:, 0], views=tokens[skip:, 1:])
                    else:
                        writer.append(tokens[skip:])
                if which == len(writers) - 1:
                    bar.update(len(tokens))

            for rows, pixels in loader:
                photos = len(pixels)
                pixels = pixels.flatten(0, 1) if views.count > 1 else pixels
                outs = first.forward_layers(pixels.to(options.device, non_blocking=True), encoders)
                for which, out in enumerate(outs):
                    if views.count > 1:
                        out = out.unflatten(0, (photos, views.count))
                    for tokens, meta in to_host.push(out, (rows, which)):
                        write(tokens, meta)
            for tokens, meta in to_host.flush():
                write(tokens, meta)
        finals = [writer.finish() for writer in writers]
    seconds = time.perf_counter() - began
    return [FileReport(final, "image", index.split, attrs.num_items, rows_done, seconds,
                       "resumed" if rows_done else "written", views.count)
            for final, (_, attrs, _), rows_done in zip(finals, targets, resumed)]


def extract_texts(index: SplitIndex, encoder: TextEncoder, path: Path, options: RunOptions,
                  shard: Shard = Shard()) -> FileReport:
    """Write (or resume, or keep: `keep_existing`) the caption cache of a split (this rank's shard
    of it) at ``path``."""
    target, attrs, captions = _target("text", index, encoder, path, shard)
    if not options.overwrite and keep_existing(target, attrs, captions):
        return kept_report(target, attrs)
    start, stop = shard.bounds(index.num_captions)
    token_ids = encoder.tokenize(captions)
    began = time.perf_counter()
    with TextCacheWriter(target, attrs, token_ids, captions,
                         index.caption_image_index[start:stop],
                         overwrite=options.overwrite) as writer:
        done = writer.rows_written
        to_host = _ToHost(options.device)
        encoder.to(options.device)
        with _progress(options, target, stop - start, done, "cap") as bar, \
                torch.inference_mode(), _autocast(options):
            def write(states: np.ndarray, lengths: np.ndarray) -> None:
                writer.append([states[i, :n] for i, n in enumerate(lengths)])
                bar.update(len(lengths))

            for lo in range(done, stop - start, options.batch_size):
                hi = min(lo + options.batch_size, stop - start)
                input_ids, mask = encoder.pad_batch(writer.input_ids_rows(lo, hi))
                if options.cuda:
                    input_ids, mask = input_ids.pin_memory(), mask.pin_memory()
                out = encoder(input_ids.to(options.device, non_blocking=True),
                              mask.to(options.device, non_blocking=True))
                for states, lengths in to_host.push(out, writer.token_lengths(lo, hi)):
                    write(states, lengths)
            for states, lengths in to_host.flush():
                write(states, lengths)
        final = writer.finish()
    return FileReport(final, "text", index.split, attrs.num_items, done,
                      time.perf_counter() - began, "resumed" if done else "written")


# ------------------------------------------------------------------------------------------ merge


_SHARD_NAME = re.compile(r"\.shard-(\d{4})-of-(\d{4})$")


def find_shards(final: Path) -> list[Path]:
    """The shard files of ``final`` (``<stem>.shard-R-of-W.h5``); InputError if none or mixed."""
    found: dict[int, list[Path]] = {}
    for candidate in sorted(final.parent.glob(f"{final.stem}.shard-*-of-*{final.suffix}")):
        match = _SHARD_NAME.search(candidate.name[:-len(final.suffix)])
        if match:
            found.setdefault(int(match.group(2)), []).append(candidate)
    if not found:
        partial = sorted(final.parent.glob(f"{final.stem}.shard-*{final.suffix}.partial"))
        hint = f" (unfinished: {partial[0].name}; rerun that rank)" if partial else ""
        raise InputError(f"{final}: no shard files {final.stem}.shard-R-of-W{final.suffix} "
                         f"to merge{hint}")
    if len(found) > 1:
        raise InputError(f"{final.parent}: shards of runs with different world sizes "
                         f"({sorted(found)}) for {final.name}; delete the stale ones")
    (world, shards), = found.items()
    if len(shards) != world:
        present = {int(_SHARD_NAME.search(p.name[:-len(final.suffix)]).group(1)) for p in shards}
        missing = sorted(set(range(world)) - present)
        raise InputError(f"{final}: shards of ranks {missing} of {world} are missing "
                         "(still running, or interrupted: rerun those ranks)")
    return shards


def merge_split_shards(final: Path, overwrite: bool = False) -> FileReport:
    """Join the shard files of ``final`` into ``final`` (checks identity and row coverage); a
    complete ``final`` of the same work is kept, one of other work is refused unless ``overwrite``."""
    shards = find_shards(final)
    if not overwrite:
        readers = [open_cache(p) for p in shards]  # in rank order = row order
        whole = unsharded(readers[0].attrs)
        if keep_existing(final, whole, [key for r in readers for key in _row_keys(r)]):
            return kept_report(final, whole)
    began = time.perf_counter()
    merged = merge_shards(shards, final, overwrite=overwrite)
    cache = open_cache(merged)
    return FileReport(merged, cache.attrs.modality, cache.attrs.split, len(cache), 0,
                      time.perf_counter() - began, "merged", cache.attrs.views)


# ------------------------------------------------------------------------------------------ summary


def output_path(out: str | Path, dataset: str, split: str, modality: str, tag: str) -> Path:
    """``<out>/<dataset>/<split>/<modality>-<tag>.h5``."""
    if not tag or "/" in tag or tag.startswith("."):
        raise InputError(f"--tag {tag!r}: must be a plain file-name part")
    return default_cache_path(out, dataset, split, modality, tag)


def format_summary(reports: Sequence[FileReport]) -> str:
    """The summary table: file, status, rows, views per row, seconds, items/s, MB."""
    header = (f"{'file':<56} {'status':<8} {'rows':>8} {'views':>5} {'seconds':>9} "
              f"{'items/s':>9} {'MB':>9}")
    lines = [header, "-" * len(header)]
    for r in reports:
        name = str(r.path) if len(str(r.path)) <= 56 else "..." + str(r.path)[-53:]
        status = f"{r.status}" if r.status != "resumed" else f"from {r.resumed_from}"
        views = r.views if r.modality == "image" else "-"
        lines.append(f"{name:<56} {status:<8} {r.rows:>8} {views:>5} {r.seconds:>9.2f} "
                     f"{r.items_per_s:>9.1f} {r.megabytes:>9.1f}")
    return "\n".join(lines)


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on ``folder`` (``flock`` of the directory) for a read-modify-write."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _summary_key(path: Path, folder: Path) -> str:
    """A summary entry's key: the cache file's path under the summary's folder (``test/x.h5``)."""
    try:
        return path.resolve().relative_to(folder.resolve()).as_posix()
    except ValueError:
        return str(path)


def _read_summary(path: Path) -> dict[str, dict[str, Any]]:
    """The entries of an existing summary file, by key (none if there is no file)."""
    if not path.exists():
        return {}
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
        files = payload["files"]
        if isinstance(files, list):  # one call's list, as written before summaries were merged
            files = {_summary_key(Path(entry["file"]), path.parent):
                     {**entry, "settings": payload.get("settings", {})} for entry in files}
        if not isinstance(files, dict):
            raise TypeError(f"'files' is a {type(files).__name__}")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise InputError(f"{path}: unreadable summary ({err}); fix or delete it (the caches do "
                         "not depend on it)") from None
    return files


def write_summary(reports: Sequence[FileReport], folder: Path, shard: Shard = Shard(),
                  settings: dict[str, Any] | None = None, name: str = "extract-summary") -> Path:
    """Merge the reports into ``<folder>/<name>[.rank-R-of-W].json``, keyed by cache file.

    The file holds ``{"files": {"<split>/<file>.h5": report + "settings"}}``. A call replaces the
    entries of the files it wrote, resumed or merged, adds an entry for a file it kept only where
    there is none (the entry of the call that wrote it says more), and leaves every other entry
    alone, so calls with other backbones add up. The file is replaced atomically, under a lock on
    ``folder`` so that concurrent calls do not lose each other's entries.
    """
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}{shard.summary_suffix}.json"
    with _locked(folder):
        entries = _read_summary(path)
        for report in reports:
            key = _summary_key(report.path, folder)
            if report.status != "kept" or key not in entries:
                entries[key] = {**report.to_dict(), "settings": settings or {}}
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps({"files": dict(sorted(entries.items()))}, indent=2, default=str)
                       + "\n", encoding="utf-8")
        os.replace(tmp, path)
    return path
