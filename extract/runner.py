"""The extraction loop: decode -> forward -> write, resumable, shardable over ranks.

One call of `extract_images` / `extract_texts` writes one cache file (one split, one modality, one
encoder) through `cache.store`'s writers:

* images are decoded in DataLoader workers (``ImageDataset``), batched, run through the frozen
  encoder under ``torch.inference_mode`` (bf16 autocast on CUDA, pinned memory and non-blocking copies)
  and written one batch per HDF5 write, the row count committed after each batch;
* captions are tokenised up front (so the ragged layout is known before the first write) and run in
  batches of consecutive rows;
* a rerun after an interruption continues from the committed row count; with the same batch size the
  batches are the same as in an uninterrupted run, so the file is bit-identical on CPU;
* with ``world_size > 1`` each rank writes the contiguous block of rows `Shard.bounds` gives it into its
  own shard file; `merge_split_shards` joins the shards into the normal file afterwards.

On CUDA the device-to-host copy of batch ``i`` overlaps the forward pass of batch ``i + 1``
(`_ToHost`), so the GPU does not wait for the HDF5 write.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from cache.errors import InputError
from cache.store import (CacheAttrs, ImageCacheWriter, TextCacheWriter, default_cache_path,
                         merge_shards, open_cache)
from extract.backbones import ImageEncoder, TextEncoder
from extract.datasets import ImageDataset, SplitIndex


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


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA if available; under torchrun the GPU of LOCAL_RANK), ``cpu`` or ``cuda[:i]``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(f"--device {name}: CUDA is not available on this machine")
        if name == "cuda":
            name = f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count()}"
    elif name != "cpu":
        raise InputError(f"--device must be auto, cpu or cuda[:index], got {name!r}")
    return torch.device(name)


@dataclass(frozen=True)
class RunOptions:
    """How to run: batch size, decoding workers, device, what to do with existing files.

    ``skip_existing`` skips a target whose complete file was written with the same settings (a file
    from different settings is still an error); ``overwrite`` replaces it.
    """

    batch_size: int = 64
    workers: int = min(4, os.cpu_count() or 1)
    device: torch.device = torch.device("cpu")
    overwrite: bool = False
    skip_existing: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.overwrite and self.skip_existing:
            raise InputError("--overwrite and --skip-existing exclude each other")
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
                "megabytes": round(self.megabytes, 2)}


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


def image_attrs(encoder: ImageEncoder, index: SplitIndex) -> CacheAttrs:
    """Cache attributes of an image encoder's features over a whole split."""
    layout = encoder.layout
    return CacheAttrs(modality="image", encoder=encoder.name, weights_id=encoder.weights_id,
                      weights_hash=encoder.weights_hash, dim=layout.dim,
                      num_items=index.num_images, layer=encoder.layer,
                      num_tokens=layout.num_tokens, prefix_tokens=layout.prefix_tokens,
                      grid=layout.grid, resolution=encoder.resolution,
                      preprocessing=encoder.preprocessing, dataset=index.dataset, split=index.split,
                      extra={"images_root": str(index.images_root)})


def text_attrs(encoder: TextEncoder, index: SplitIndex) -> CacheAttrs:
    """Cache attributes of a text encoder's token states over a whole split ([CLS]/[SEP] counted)."""
    tokenizer = encoder.tokenizer
    preprocessing = {"tokenizer": type(tokenizer).__name__, "vocab_size": len(tokenizer),
                     "lowercase": bool(getattr(tokenizer, "do_lower_case", False)),
                     "max_length": encoder.max_length, "truncation": True,
                     "special_tokens": ["[CLS]", "[SEP]"]}
    return CacheAttrs(modality="text", encoder=encoder.name, weights_id=encoder.weights_id,
                      weights_hash=encoder.weights_hash, dim=encoder.dim,
                      num_items=index.num_captions, layer=encoder.layer,
                      num_tokens=encoder.max_length, prefix_tokens=1, suffix_tokens=1,
                      preprocessing=preprocessing, dataset=index.dataset, split=index.split)


def refuse_complete(path: Path, attrs: CacheAttrs, skip_same: bool = False) -> bool:
    """InputError if a complete file already exists at ``path`` (saying whether it differs).

    With ``skip_same``, a complete file with the same settings returns True (nothing to do).
    """
    if not path.exists():
        return False
    try:
        existing = open_cache(path, allow_incomplete=True).attrs
    except InputError:
        raise InputError(f"{path}: a file that is not a valid cache is in the way; pass "
                         "--overwrite to replace it") from None
    diff = existing.identity_diff(attrs)
    if not diff and skip_same:
        return True
    if diff:
        raise InputError(f"{path}: a complete cache from a different extraction exists "
                         f"({'; '.join(diff[:3])}); pass --overwrite to replace it or --tag to "
                         "write beside it")
    raise InputError(f"{path}: a complete cache with these settings already exists; pass "
                     "--overwrite to write it again or --skip-existing to keep it")


def _skipped(path: Path, attrs: CacheAttrs) -> FileReport:
    return FileReport(path, attrs.modality, attrs.split, attrs.num_items, attrs.num_items, 0.0,
                      "skipped")


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
    return tqdm(total=total, initial=done, unit=unit, desc=path.name, dynamic_ncols=True,
                disable=None if options.progress else True, leave=False)


def extract_images(index: SplitIndex, encoder: ImageEncoder, path: Path, options: RunOptions,
                   shard: Shard = Shard()) -> FileReport:
    """Write (or resume) the image cache of a split (this rank's shard of it) at ``path``."""
    attrs = shard.attrs(image_attrs(encoder, index))
    target = shard.path(path)
    if not options.overwrite and refuse_complete(target, attrs, options.skip_existing):
        return _skipped(target, attrs)
    start, stop = shard.bounds(index.num_images)
    if index.image_paths is None:
        raise InputError(f"{index.dataset}/{index.split}: image paths unknown (needs "
                         "id_mapping.json beside the caption files and --images)")
    ids, rel_paths = index.image_ids[start:stop], index.image_paths[start:stop]
    began = time.perf_counter()
    with ImageCacheWriter(target, attrs, ids, rel_paths, overwrite=options.overwrite) as writer:
        done = writer.rows_written
        dataset = Subset(ImageDataset(index, encoder.transform), range(start + done, stop))
        loader = DataLoader(dataset, batch_size=options.batch_size, num_workers=options.workers,
                            pin_memory=options.cuda, shuffle=False)
        to_host = _ToHost(options.device)
        encoder.to(options.device)
        with _progress(options, target, stop - start, done, "img") as bar, \
                torch.inference_mode(), _autocast(options):
            def write(tokens: np.ndarray, rows: torch.Tensor) -> None:
                if int(rows[0]) != start + writer.rows_written:
                    raise RuntimeError(f"batch starts at row {int(rows[0])}, expected "
                                       f"{start + writer.rows_written}")
                writer.append(tokens)
                bar.update(len(tokens))

            for rows, pixels in loader:
                out = encoder(pixels.to(options.device, non_blocking=True))
                for tokens, batch_rows in to_host.push(out, rows):
                    write(tokens, batch_rows)
            for tokens, batch_rows in to_host.flush():
                write(tokens, batch_rows)
        final = writer.finish()
    return FileReport(final, "image", index.split, attrs.num_items, done,
                      time.perf_counter() - began, "resumed" if done else "written")


def extract_texts(index: SplitIndex, encoder: TextEncoder, path: Path, options: RunOptions,
                  shard: Shard = Shard()) -> FileReport:
    """Write (or resume) the caption cache of a split (this rank's shard of it) at ``path``."""
    attrs = shard.attrs(text_attrs(encoder, index))
    target = shard.path(path)
    if not options.overwrite and refuse_complete(target, attrs, options.skip_existing):
        return _skipped(target, attrs)
    start, stop = shard.bounds(index.num_captions)
    token_ids = encoder.tokenize(index.captions[start:stop])
    began = time.perf_counter()
    with TextCacheWriter(target, attrs, token_ids, index.captions[start:stop],
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
    """Join the shard files of ``final`` into ``final`` (checks identity and row coverage)."""
    shards = find_shards(final)
    if final.exists() and not overwrite:
        raise InputError(f"{final}: a complete cache already exists; pass --overwrite to merge "
                         "the shards again")
    began = time.perf_counter()
    merged = merge_shards(shards, final, overwrite=overwrite)
    cache = open_cache(merged)
    return FileReport(merged, cache.attrs.modality, cache.attrs.split, len(cache), 0,
                      time.perf_counter() - began, "merged")


# ------------------------------------------------------------------------------------------ summary


def output_path(out: str | Path, dataset: str, split: str, modality: str, tag: str) -> Path:
    """``<out>/<dataset>/<split>/<modality>-<tag>.h5``."""
    if not tag or "/" in tag or tag.startswith("."):
        raise InputError(f"--tag {tag!r}: must be a plain file-name part")
    return default_cache_path(out, dataset, split, modality, tag)


def format_summary(reports: Sequence[FileReport]) -> str:
    """The summary table: file, status, rows, seconds, items/s, MB."""
    header = (f"{'file':<56} {'status':<8} {'rows':>8} {'seconds':>9} {'items/s':>9} "
              f"{'MB':>9}")
    lines = [header, "-" * len(header)]
    for r in reports:
        name = str(r.path) if len(str(r.path)) <= 56 else "..." + str(r.path)[-53:]
        status = f"{r.status}" if r.status != "resumed" else f"from {r.resumed_from}"
        lines.append(f"{name:<56} {status:<8} {r.rows:>8} {r.seconds:>9.2f} "
                     f"{r.items_per_s:>9.1f} {r.megabytes:>9.1f}")
    return "\n".join(lines)


def write_summary(reports: Sequence[FileReport], folder: Path, shard: Shard = Shard(),
                  settings: dict[str, Any] | None = None, name: str = "extract-summary") -> Path:
    """Write the reports as JSON to ``<folder>/<name>[.rank-R-of-W].json``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}{shard.summary_suffix}.json"
    payload = {"settings": settings or {}, "files": [r.to_dict() for r in reports]}
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
    return path
