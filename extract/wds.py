"""WebDataset tar shards as img2dataset and clip-retrieval write them: every sample is a group of
members sharing a key (``000123.jpg`` + ``000123.txt``, or ``000123.json`` holding ``captions``, a
list, or ``caption`` / ``text``).

``--data-path`` names the shards with brace ranges (``shards/{000000..000099}.tar``), once for all
splits (then `extract.captioned.assign_split` splits the photos by a hash of their path) or once per
split (``train=shards/train-{0000..0009}.tar``). Reading uses the standard library's `tarfile`,
not the ``webdataset`` package: `scan_shards` reads every shard once from front to back (member
headers and the small caption members; photo bytes are skipped), which checks each shard whole
before any forward pass and records where each photo's bytes are. The photos are then read by
offset (`extract.tar_members`), so the ordinary map-style DataLoader, the rank sharding
(``--rank/--world-size``, torchrun) and the row-level resume of `extract.runner` work unchanged:
rows follow shard order, a rank reads the shards of its block of rows, and a rerun after a kill
seeks straight past the rows (and shards) it has written. ``webdataset``'s iterable pipeline would
need a second extraction loop for the same result and one more dependency.
"""
from __future__ import annotations

import io
import json
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cache.errors import InputError
from extract.captioned import (CAPTION_KEYS, SPLIT_ALIASES, CaptionRow, LoadedSplits,
                               TableOptions, group_rows)
from extract.datasets import SplitIndex
from extract.tar_members import remember

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"(\d+)\.\.(\d+)")
_LABELLED = re.compile(r"([A-Za-z][\w-]*)=(.+)")


def expand_braces(pattern: str) -> list[str]:
    """Bash-style brace expansion as WebDataset writes shard lists: ``{000..009}`` (a zero-padded
    range) and ``{a,b}``, left to right."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    numbers = _RANGE.fullmatch(body)
    if numbers:
        low, high = numbers.groups()
        if int(high) < int(low):
            raise InputError(f"{pattern!r}: range {{{body}}} runs backwards")
        items = [f"{n:0{len(low)}d}" for n in range(int(low), int(high) + 1)]
    else:
        items = body.split(",")
    head, tail = pattern[:match.start()], pattern[match.end():]
    return [out for item in items for out in expand_braces(head + item + tail)]


def split_label(value: str) -> tuple[str | None, str]:
    """``SPLIT=PATTERN`` -> (split, pattern); a bare pattern -> (None, pattern)."""
    labelled = _LABELLED.fullmatch(value)
    if labelled is None:
        return None, value
    return SPLIT_ALIASES.get(labelled.group(1).lower(), labelled.group(1)), labelled.group(2)


def shard_lists(values: tuple[str, ...]) -> dict[str | None, list[Path]]:
    """``--data-path`` values: one unlabelled shard pattern, or ``SPLIT=PATTERN`` per split;
    every shard must exist."""
    lists: dict[str | None, list[Path]] = {}
    for value in values:
        split, pattern = split_label(value)
        if split in lists:
            raise InputError(f"--data-path {value!r}: split {split or '(unlabelled)'} given twice")
        shards = [Path(path) for path in expand_braces(pattern)]
        missing = [path for path in shards if not path.is_file()]
        if missing:
            more = f" ({len(missing) - 1} more missing)" if len(missing) > 1 else ""
            raise InputError(f"--data-path {pattern!r}: shard {missing[0]} not found{more}")
        lists[split] = shards
    if None in lists and len(lists) > 1:
        raise InputError("--data-path: give one shard pattern for all splits, or SPLIT=PATTERN for "
                         "every split")
    return lists


@dataclass(frozen=True)
class Sample:
    """One sample of a shard: its photo member (None if it has none) and its captions."""

    where: str
    key: str
    image: str | None
    captions: list[str]


def scan_shard(shard: Path) -> list[Sample]:
    """The samples of one shard, in member order; InputError naming the shard and member if the
    shard is truncated or damaged or a sample has no caption."""
    size = os.path.getsize(shard)
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    table: dict[str, tuple[int, int]] = {}
    last = "(none)"
    try:
        with tarfile.open(shard, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                if member.offset_data + member.size > size:
                    raise InputError(f"{shard}: truncated inside member {member.name!r} "
                                     f"({max(0, size - member.offset_data)} of {member.size} "
                                     "bytes); rewrite or re-download the shard")
                last = member.name
                table[member.name] = (member.offset_data, member.size)
                folder, _, base = member.name.rpartition("/")
                stem, dot, extension = base.partition(".")
                if dot and not stem.startswith("__"):
                    key = f"{folder}/{stem}" if folder else stem
                    groups.setdefault(key, {})[extension.lower()] = member
            samples = [_sample(shard, tar, key, members) for key, members in groups.items()]
        remember(shard.resolve(), table)
        return samples
    except tarfile.TarError as err:
        raise InputError(f"{shard}: truncated or damaged after member {last!r} ({err}); rewrite "
                         "or re-download the shard") from None


def _sample(shard: Path, tar: tarfile.TarFile, key: str,
            members: dict[str, tarfile.TarInfo]) -> Sample:
    image = next((members[ext].name for ext in IMAGE_EXTENSIONS if ext in members), None)
    if "txt" in members:
        where = f"{shard}:{members['txt'].name}"
        captions = [_text(where, tar, members["txt"])]
    elif "json" in members:
        where = f"{shard}:{members['json'].name}"
        captions = _json_captions(where, _text(where, tar, members["json"]))
    else:
        raise InputError(f"{shard}: sample {key!r} has no caption (a .txt or .json member; "
                         f"members: {', '.join(sorted(members))})")
    if not all(captions):
        raise InputError(f"{where}: empty caption")
    return Sample(where, key, image, captions)


def _text(where: str, tar: tarfile.TarFile, member: tarfile.TarInfo) -> str:
    handle = tar.extractfile(member)
    data = handle.read() if handle is not None else b""
    try:
        return data.decode("utf-8-sig").strip()
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise InputError(f"{where}:{line}: not valid UTF-8") from None


def _json_captions(where: str, text: str) -> list[str]:
    try:
        record: Any = json.loads(text)
    except ValueError as err:
        raise InputError(f"{where}: not valid JSON ({err})") from None
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected a JSON object")
    key = next((k for k in CAPTION_KEYS if k in record), None)
    if key is None:
        raise InputError(f"{where}: no caption key (looked for {', '.join(CAPTION_KEYS)}); keys "
                         f"found: {', '.join(record) or 'none'}")
    values = record[key] if isinstance(record[key], list) else [record[key]]
    if not values or not all(isinstance(v, str) for v in values):
        raise InputError(f"{where}: {key!r} must be a caption or a list of captions")
    return [" ".join(v.split()) for v in values]


def load_wds(values: tuple[str, ...], name: str, splits: list[str],
             options: TableOptions) -> LoadedSplits:
    """The requested splits of WebDataset shards: photo paths ``<shard>/<member>`` relative to the
    shards' common folder (`extract.tar_members` reads them)."""
    lists = shard_lists(values)
    shards = [shard for group in lists.values() for shard in group]
    root = Path(os.path.commonpath([str(s.resolve().parent) for s in shards]))
    rows: list[CaptionRow] = []
    skipped: list[str] = []
    for split, group in lists.items():
        for shard in group:
            relative = shard.resolve().relative_to(root).as_posix()
            for sample in scan_shard(shard):
                if sample.image is None:
                    if not options.skip_missing:
                        raise InputError(f"{shard}: sample {sample.key!r} has no photo member "
                                         f"({', '.join(IMAGE_EXTENSIONS)}); pass --skip-missing "
                                         "to leave it out")
                    skipped.append(f"{shard}: {sample.key}")
                    continue
                rows.extend(CaptionRow(sample.where, f"{relative}/{sample.image}", caption, split)
                            for caption in sample.captions)
    if not rows:
        raise InputError(f"--data-path {', '.join(values)}: no samples with a photo")
    loaded = group_rows(rows, name, splits, root, options, source=", ".join(values),
                        check_photos=False)
    loaded.skipped[:0] = skipped
    return loaded


def write_shards(index: SplitIndex, folder: str | Path, per_shard: int = 1000,
                 prefix: str = "") -> str:
    """Write the photos of a split and their captions as WebDataset shards (``<key>.<ext>`` +
    ``<key>.json`` with a ``captions`` list, as img2dataset writes them) into ``folder``; returns
    the brace pattern of the shards for ``--data-path``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    captions: list[list[str]] = [[] for _ in range(index.num_images)]
    for text, row in zip(index.captions, index.caption_image_index):
        captions[int(row)].append(text)
    count = max(1, -(-index.num_images // per_shard))
    width = max(6, len(str(count - 1)))
    for shard in range(count):
        with tarfile.open(folder / f"{prefix}{shard:0{width}d}.tar", "w") as tar:
            for row in range(shard * per_shard, min((shard + 1) * per_shard, index.num_images)):
                key = f"{row:09d}"
                extension = Path(index.image_paths[row]).suffix.lower() or ".jpg"
                tar.add(index.image_file(row), arcname=f"{key}{extension}")
                _add_bytes(tar, f"{key}.json",
                           json.dumps({"captions": captions[row]}).encode("utf-8"))
    return str(folder / f"{prefix}{{{0:0{width}d}..{count - 1:0{width}d}}}.tar")


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))
