"""Your own captioned photos: one (photo, caption) pair per row of a CSV / TSV / JSONL file or of a
Hugging Face ``imagefolder`` metadata file, grouped into the splits `extract.datasets.SplitIndex`
describes.

* The photo and caption columns are detected (`IMAGE_KEYS`, `CAPTION_KEYS`) or named; a JSONL or
  imagefolder caption may be a list of strings (several captions in one row).
* Rows of the same photo are grouped, in first-appearance order, with any number of captions each.
* A ``split`` column decides the split (``val``/``valid``/``validation`` are ``dev``); without one,
  `assign_split` puts every photo in train/dev/test by a stable hash of (seed, photo path), so a
  photo never lands in two splits and adding rows never moves old photos.
* Photo paths are relative to the images folder, or absolute; `group_rows` checks that every photo
  exists before any forward pass (or leaves the missing ones out with ``skip_missing``).

Every problem a user can fix raises `InputError` with one line naming the file and line.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from cache.errors import InputError
from extract.datasets import SplitIndex
from extract.tar_members import photo_exists

IMAGE_KEYS = ("image", "filepath", "file_name", "image_path", "file", "path")
CAPTION_KEYS = ("caption", "text", "title", "captions")
SPLIT_KEY = "split"
SPLITS = ("train", "dev", "test")
SPLIT_ALIASES = {"val": "dev", "valid": "dev", "validation": "dev"}
DEFAULT_RATIO = (0.8, 0.1, 0.1)
METADATA_FILES = ("metadata.jsonl", "metadata.csv")


@dataclass(frozen=True)
class CaptionRow:
    """One row of a captioned-photo table: where it is (``file:line``), its photo path, its
    caption and the split its ``split`` column names (None without one)."""

    where: str
    photo: str
    caption: str
    split: str | None = None


@dataclass(frozen=True)
class TableOptions:
    """How to read a table and split it: key columns (None: detected), split ratios and seed,
    whether missing photos are left out instead of stopping the command."""

    image_key: str | None = None
    caption_key: str | None = None
    split_ratio: tuple[float, float, float] | None = None
    seed: int = 0
    skip_missing: bool = False


@dataclass
class LoadedSplits:
    """The splits of a dataset and the photos left out because they were missing."""

    indexes: dict[str, SplitIndex]
    skipped: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------ tables


def read_text(path: Path) -> str:
    """A whole UTF-8 text file; `InputError` naming the line of the first invalid byte."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise InputError(f"{path}: cannot read: {err.strerror or err}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise InputError(f"{path}:{line}: not valid UTF-8") from None
    if not text.strip():
        raise InputError(f"{path}: file is empty")
    return text


def _pick_key(path: Path, found: list[str], given: str | None, candidates: tuple[str, ...],
              what: str, option: str) -> str:
    """The column holding ``what``: ``given`` (which must exist) or the first of ``candidates``."""
    if given is not None:
        if given not in found:
            raise InputError(f"{path}: no column {given!r} ({option}); columns found: "
                             f"{', '.join(found) or 'none'}")
        return given
    for key in candidates:
        if key in found:
            return key
    raise InputError(f"{path}: no {what} column (looked for {', '.join(candidates)}); columns "
                     f"found: {', '.join(found) or 'none'}; name it with {option}")


def _keys(path: Path, found: list[str], options: TableOptions) -> tuple[str, str]:
    return (_pick_key(path, found, options.image_key, IMAGE_KEYS, "photo", "--image-key"),
            _pick_key(path, found, options.caption_key, CAPTION_KEYS, "caption", "--caption-key"))


def _captions(where: str, value: Any, key: str) -> list[str]:
    """The caption(s) of one cell: a string, or a list of strings (JSON)."""
    values = value if isinstance(value, list) else [value]
    if not values:
        raise InputError(f"{where}: empty caption list in {key!r}")
    out = []
    for item in values:
        if item is None:
            item = ""
        if not isinstance(item, str):
            raise InputError(f"{where}: caption in {key!r} is a {type(item).__name__}, not text")
        if not item.strip():
            raise InputError(f"{where}: empty caption in {key!r}")
        out.append(" ".join(item.split()))
    return out


def _row(where: str, record: dict[str, Any], image_key: str, caption_key: str,
         prefix: str = "", split: str | None = None) -> Iterator[CaptionRow]:
    photo = record.get(image_key)
    if not isinstance(photo, str) or not photo.strip():
        raise InputError(f"{where}: empty photo path in {image_key!r}")
    if SPLIT_KEY in record and split is None:
        split = record[SPLIT_KEY]
        if not isinstance(split, str) or not split.strip():
            raise InputError(f"{where}: empty {SPLIT_KEY!r}")
        split = SPLIT_ALIASES.get(split.strip().lower(), split.strip())
    for caption in _captions(where, record.get(caption_key), caption_key):
        yield CaptionRow(where, prefix + photo.strip(), caption, split)


def read_delimited(path: Path, options: TableOptions, delimiter: str, prefix: str = "",
                   split: str | None = None) -> list[CaptionRow]:
    """The rows of a CSV (``,``) or TSV (tab) file with a header line."""
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""), delimiter=delimiter)
    found = [name for name in (reader.fieldnames or []) if name]
    image_key, caption_key = _keys(path, found, options)
    rows: list[CaptionRow] = []
    try:
        for record in reader:
            where = f"{path}:{reader.line_num}"
            if None in record:
                raise InputError(f"{where}: more fields than the {len(found)} columns of the "
                                 "header (a caption with the delimiter needs quotes)")
            rows.extend(_row(where, record, image_key, caption_key, prefix, split))
    except csv.Error as err:
        raise InputError(f"{path}:{reader.line_num}: {err}") from None
    return _nonempty(path, rows)


def read_jsonl(path: Path, options: TableOptions, prefix: str = "",
               split: str | None = None) -> list[CaptionRow]:
    """The rows of a JSON-lines file (one object per line; a caption may be a list)."""
    rows: list[CaptionRow] = []
    for number, line in enumerate(read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except ValueError as err:
            raise InputError(f"{where}: not valid JSON ({err})") from None
        if not isinstance(record, dict):
            raise InputError(f"{where}: expected a JSON object, got a {type(record).__name__}")
        image_key, caption_key = _keys(Path(where), list(record), options)
        rows.extend(_row(where, record, image_key, caption_key, prefix, split))
    return _nonempty(path, rows)


def _nonempty(path: Path, rows: list[CaptionRow]) -> list[CaptionRow]:
    if not rows:
        raise InputError(f"{path}: no rows")
    return rows


TABLE_READERS: dict[str, Callable[..., list[CaptionRow]]] = {
    "csv": lambda path, options, **kw: read_delimited(path, options, ",", **kw),
    "tsv": lambda path, options, **kw: read_delimited(path, options, "\t", **kw),
    "jsonl": read_jsonl,
}


def read_imagefolder(folder: Path, options: TableOptions) -> list[CaptionRow]:
    """The rows of a Hugging Face imagefolder: ``metadata.jsonl`` or ``metadata.csv`` beside the
    photos (``file_name``, ``text``), or one per split subfolder (``train/metadata.jsonl``: the
    folder names the split, its photo paths are relative to it)."""
    if not folder.is_dir():
        raise InputError(f"{folder}: imagefolder not found")
    top = [folder / name for name in METADATA_FILES if (folder / name).is_file()]
    nested = sorted(sub / name for sub in folder.iterdir() if sub.is_dir()
                    for name in METADATA_FILES if (sub / name).is_file())
    if not top and not nested:
        raise InputError(f"{folder}: no {' or '.join(METADATA_FILES)} in it or in a split "
                         "subfolder (train/, validation/, test/)")
    rows = []
    for path in top + nested:
        sub = path.parent.relative_to(folder).as_posix()
        prefix, split = ("", None) if sub == "." else (
            f"{sub}/", SPLIT_ALIASES.get(sub.lower(), sub))
        reader = TABLE_READERS[path.suffix[1:]]
        rows.extend(reader(path, options, prefix=prefix, split=split))
    return rows


# ------------------------------------------------------------------------------------------ splits


def parse_ratio(value: str) -> tuple[float, float, float]:
    """``--split-ratio 0.8,0.1,0.1``: the train, dev and test fractions (normalised)."""
    try:
        parts = tuple(float(part) for part in value.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise InputError(f"--split-ratio {value!r}: give three fractions train,dev,test "
                         "(0.8,0.1,0.1)")
    total = sum(parts)
    return tuple(p / total for p in parts)  # type: ignore[return-value]


def assign_split(photo: str, ratio: tuple[float, float, float], seed: int) -> str:
    """The split of a photo: a stable hash of (seed, path) placed on the cumulative ratios."""
    digest = hashlib.sha256(f"{seed}\0{photo}".encode("utf-8")).digest()
    point = int.from_bytes(digest[:8], "big") / 2 ** 64
    edge = 0.0
    for name, share in zip(SPLITS, ratio):
        edge += share
        if point < edge:
            return name
    return next(name for name, share in reversed(list(zip(SPLITS, ratio))) if share > 0)


def photo_splits(rows: list[CaptionRow], options: TableOptions, source: str) -> dict[str, str]:
    """The split of every photo: its rows' ``split`` column (the same on every row), else the
    hash of `assign_split`."""
    labelled = [row.split is not None for row in rows]
    if any(labelled) and not all(labelled):
        row = rows[labelled.index(False)] if labelled[0] else rows[labelled.index(True)]
        raise InputError(f"{row.where}: some rows name a {SPLIT_KEY!r} and others do not")
    if all(labelled) and options.split_ratio is not None:
        raise InputError(f"{source}: the rows name their {SPLIT_KEY!r}; --split-ratio applies only "
                         "to data without one")
    splits: dict[str, str] = {}
    first: dict[str, str] = {}
    ratio = options.split_ratio or DEFAULT_RATIO
    for row in rows:
        split = row.split or assign_split(row.photo, ratio, options.seed)
        if splits.setdefault(row.photo, split) != split:
            raise InputError(f"{row.where}: photo {row.photo!r} is in split {split!r} here but in "
                             f"{splits[row.photo]!r} at {first[row.photo]}")
        first.setdefault(row.photo, row.where)
    return splits


def group_rows(rows: list[CaptionRow], dataset: str, splits: list[str], images_root: Path,
               options: TableOptions, source: str, check_photos: bool) -> LoadedSplits:
    """The requested splits of ``rows``: photos in first-appearance order, each photo's captions
    consecutive. With ``check_photos`` every photo must exist under ``images_root`` (or be
    absolute): the first missing one stops the command naming file, line and photo, unless
    ``options.skip_missing`` (then it is left out and listed in ``skipped``)."""
    split_of = photo_splits(rows, options, source)
    captions: dict[str, list[str]] = {}
    where: dict[str, str] = {}
    for row in rows:
        captions.setdefault(row.photo, []).append(row.caption)
        where.setdefault(row.photo, row.where)
    skipped = []
    if check_photos:
        missing = [photo for photo in captions if not photo_exists(images_root / photo)]
        if missing and not options.skip_missing:
            more = f" ({len(missing) - 1} more missing)" if len(missing) > 1 else ""
            raise InputError(f"{where[missing[0]]}: photo {missing[0]!r} not found "
                             f"({images_root / missing[0]}){more}; fix the path or pass "
                             "--skip-missing to leave it out")
        skipped = [f"{where[photo]}: {photo}" for photo in missing]
        for photo in missing:
            del captions[photo]
    counts = {name: sum(1 for photo in captions if split_of[photo] == name)
              for name in dict.fromkeys(split_of.values())}
    indexes = {}
    for split in splits:
        photos = [photo for photo in captions if split_of[photo] == split]
        if not photos:
            found = ", ".join(f"{name} {n}" for name, n in counts.items() if n) or "none"
            raise InputError(f"{source}: split {split!r} has no photos (photos per split: "
                             f"{found}); choose splits with --split or set --split-ratio")
        texts = [caption for photo in photos for caption in captions[photo]]
        index = np.repeat(np.arange(len(photos)), [len(captions[photo]) for photo in photos])
        indexes[split] = SplitIndex(dataset=dataset, split=split, image_ids=photos,
                                    image_paths=photos, captions=texts,
                                    caption_image_index=index.astype(np.int64),
                                    images_root=images_root)
    return LoadedSplits(indexes, skipped)


def write_csv(index: SplitIndex, path: str | Path) -> Path:
    """Write a split as a CSV of (``image``, ``caption``, ``split``) rows, photo paths relative to
    its images folder (what ``--dataset csv --images <that folder>`` reads back)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption", SPLIT_KEY])
        writer.writerows((index.image_paths[int(row)], text, index.split)
                         for text, row in zip(index.captions, index.caption_image_index))
    return path

