"""The HDF5 feature cache: schema, resumable writers, validating readers.

This is the only module that knows HDF5 dataset and attribute names.

Layout of one file (one split, one modality, one encoder):

image file                               text file
  tokens   float16 [N, T, D]               tokens      float16 [sum(L), D]  (ragged, no padding)
  view_tokens float16 [N, V-1, T, D] (opt.)
  lengths  int32   [N]                      offsets     int64   [N + 1]
  ids      str     [N]                      input_ids   int32   [sum(L)]
  paths    str     [N]                      image_index int64   [N]   (row in the image file)
  boxes    float32 [N, T, 4]  (optional)    captions    str     [N]
  image_wh int32   [N, 2]     (optional)

``view_tokens`` exists only in a cache of several views per photo (``cli extract --views V``, the
``views`` attribute, V > 1): ``tokens`` stays the centre view (view 0, the encoder's preprocessing),
so every reader that takes one view per photo reads such a cache unchanged and an old single-view
cache is a cache of ``views = 1``; ``view_tokens[:, v - 1]`` is augmented view v (see
`extract.views`), written in the same row commits as ``tokens``.

Every dataset is contiguous and allocated when the file is created, so a finished file can be read
through a NumPy memmap (random rows at memory speed, see bench/cache_read.py). Writers append rows in
order and commit the row count after every chunk. A file is written under ``<name>.partial`` and
renamed to its final name only after the last row, so a file with the final name is always complete;
an interrupted extraction resumes from the committed row count of its ``.partial`` file. Readers open
files without the HDF5 file lock (`open_h5`), so a ``.partial`` file can be inspected while another
process writes it.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import h5py
import numpy as np

from cache.errors import CacheMismatchError, IncompleteCacheError, InputError

SCHEMA_VERSION = 1
TOOL_VERSION = "0.1.0"
PARTIAL_SUFFIX = ".partial"
STORAGE_DTYPE = np.float16
MODALITIES = ("image", "text")


@dataclass(frozen=True)
class CacheAttrs:
    """Self-describing attributes of a cache file (what produced it and how to read it)."""

    modality: str
    encoder: str
    weights_id: str
    weights_hash: str
    dim: int
    num_items: int
    layer: int = -1
    num_tokens: int = 0
    prefix_tokens: int = 0
    suffix_tokens: int = 0
    grid: tuple[int, int] | None = None
    resolution: int | None = None
    preprocessing: dict[str, Any] = field(default_factory=dict)
    dataset: str = ""
    split: str = ""
    shard_start: int = 0
    shard_stop: int = -1
    total_items: int = -1
    extra: dict[str, Any] = field(default_factory=dict)
    weights_note: str = ""  # what the weights really are, where the id alone misleads (not identity)
    views: int = 1          # views per photo: 1 = the centre view only (``view_tokens``: the others)
    augmentation: dict[str, Any] = field(default_factory=dict)  # how views 1..V-1 were drawn

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {self.modality!r}")
        if self.grid is not None:
            object.__setattr__(self, "grid", (int(self.grid[0]), int(self.grid[1])))

    # Two identities, different on purpose:
    # IDENTITY ties a resumed, merged or kept extraction to its file: same producer AND same rows.
    IDENTITY = ("modality", "encoder", "weights_id", "weights_hash", "dim", "layer", "num_tokens",
                "prefix_tokens", "suffix_tokens", "grid", "resolution", "preprocessing", "dataset",
                "split", "num_items", "shard_start", "shard_stop", "total_items", "views",
                "augmentation")
    # FEATURE_FIELDS ties a checkpoint to its caches: same producer only, since the head reads
    # other splits, row counts and token counts (dev, test) than the ones it was trained on.
    FEATURE_FIELDS = ("encoder", "weights_id", "weights_hash", "dim", "layer", "prefix_tokens",
                      "suffix_tokens", "grid", "resolution", "preprocessing")

    def identity_diff(self, other: "CacheAttrs") -> list[str]:
        """Names and values of identity fields that differ between two attribute sets."""
        return [f"{name}: {getattr(self, name)!r} != {getattr(other, name)!r}"
                for name in self.IDENTITY if getattr(self, name) != getattr(other, name)]

    def to_hdf5(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (dict, tuple)) or value is None:
                value = json.dumps(value)
            out[f.name] = value
        return out

    @classmethod
    def from_hdf5(cls, attrs: h5py.AttributeManager, path: Path) -> "CacheAttrs":
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in attrs:
                continue
            value = attrs[f.name]
            if isinstance(value, bytes):
                value = value.decode()
            if f.name in ("grid", "resolution", "preprocessing", "extra", "augmentation") \
                    and isinstance(value, str):
                value = json.loads(value)  # JSON-encoded (None, tuples, dicts); ints are stored as is
                if f.name == "grid" and value is not None:
                    value = tuple(value)
            elif isinstance(value, np.generic):
                value = value.item()
            kwargs[f.name] = value
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                   and f.name not in kwargs]
        if missing:
            raise IncompleteCacheError(f"{path}: not a feature cache (missing attributes {missing})")
        return cls(**kwargs)


def photo_folder_extra(root: str | os.PathLike) -> dict[str, str]:
    """The ``extra`` attributes that record an image cache's photo folder: its absolute path
    (``images_root``) and the directory the extraction ran in (``extraction_cwd``)."""
    return {"images_root": str(Path(root).resolve()), "extraction_cwd": os.getcwd()}


def recorded_photo_folders(attrs: CacheAttrs, path: str | os.PathLike) -> list[Path]:
    """Where the photos of the image cache at ``path`` may be, by what it recorded, most likely
    first ([] when it records no folder). A cache written since folders are recorded absolute
    gives that folder. An older one may hold a path relative to where its extraction ran: that
    directory where recorded, else the current directory (as such caches were always read), then
    the cache file's folder."""
    root = attrs.extra.get("images_root")
    if root is None:
        return []
    root = Path(root)
    if root.is_absolute():
        return [root]
    cwd = attrs.extra.get("extraction_cwd")
    bases = [Path(cwd)] if cwd else [Path.cwd(), Path(path).resolve().parent]
    return [base / root for base in bases]


def open_h5(path: str | os.PathLike) -> h5py.File:
    """Open an HDF5 file read-only without taking the file lock, so a file another process is
    writing can be read; a file this process already has open (a writer) is shared as HDF5 requires."""
    try:
        return h5py.File(path, "r", locking=False)
    except OSError as exc:
        if "locking flag" not in str(exc):  # "file locking flag values don't match"
            raise
        return h5py.File(path, "r")


def partial_path(path: str | os.PathLike) -> Path:
    """Where an unfinished file lives until it is complete."""
    path = Path(path)
    return path.with_name(path.name + PARTIAL_SUFFIX)


def default_cache_path(root: str | os.PathLike, dataset: str, split: str, modality: str,
                       encoder_tag: str) -> Path:
    """``<root>/<dataset>/<split>/<modality>-<encoder_tag>.h5`` (the documented default)."""
    return Path(root) / dataset / split / f"{modality}-{encoder_tag}.h5"


def _alloc_early() -> h5py.h5p.PropDCID:
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    return dcpl


def _create(f: h5py.File, name: str, shape: tuple[int, ...], dtype: Any, data: Any = None) -> None:
    if data is not None and len(data) == 0:
        data = None  # h5py cannot write an empty contiguous dataset from data
    f.create_dataset(name, shape=shape, dtype=dtype, data=data, dcpl=_alloc_early())


def _check_finite(array: np.ndarray, path: Path, first_row: int) -> None:
    if not np.isfinite(array).all():
        bad = np.argwhere(~np.isfinite(array.reshape(array.shape[0], -1)).all(axis=1)).ravel()
        raise InputError(f"{path}: non-finite (NaN/Inf) features at rows "
                         f"{[first_row + int(i) for i in bad[:5]]}; nothing was written for them")


class _Writer:
    """Shared logic of the two writers: open or resume the partial file, commit, finish."""

    def __init__(self, path: str | os.PathLike, attrs: CacheAttrs, overwrite: bool) -> None:
        self.path = Path(path)
        self.attrs = attrs
        self.partial = partial_path(self.path)
        if self.path.exists() and not overwrite:
            raise InputError(f"{self.path}: a complete cache already exists; pass --overwrite to "
                             "replace it")
        if overwrite and self.partial.exists():
            self.partial.unlink()
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        if self.partial.exists():
            self.file = self._resume()
        else:
            self.file = h5py.File(self.partial, "w")
            self.file.attrs.update(attrs.to_hdf5())
            self.file.attrs["schema_version"] = SCHEMA_VERSION
            self.file.attrs["tool_version"] = TOOL_VERSION
            self.file.attrs["storage_dtype"] = np.dtype(STORAGE_DTYPE).name
            self.file.attrs["rows_written"] = 0
            self.file.attrs["complete"] = False
            self._create_datasets()
            self.file.flush()

    def _resume(self) -> h5py.File:
        try:
            f = h5py.File(self.partial, "r+")
            previous = CacheAttrs.from_hdf5(f.attrs, self.partial)
        except (OSError, IncompleteCacheError) as exc:
            raise IncompleteCacheError(
                f"{self.partial}: unreadable partial file from an interrupted run ({exc}); "
                "delete it or pass --overwrite") from exc
        diff = previous.identity_diff(self.attrs)
        if diff:
            f.close()
            raise CacheMismatchError(f"{self.partial}: the interrupted run used different settings "
                                     f"({'; '.join(diff)}); pass --overwrite to start again")
        return f

    def _create_datasets(self) -> None:
        raise NotImplementedError

    @property
    def rows_written(self) -> int:
        return int(self.file.attrs["rows_written"])

    @property
    def num_items(self) -> int:
        return self.attrs.num_items

    def _commit(self, rows: int) -> None:
        self.file.attrs["rows_written"] = rows
        self.file.flush()

    def finish(self) -> Path:
        """Mark the file complete and move it to its final name. Returns the final path."""
        if self.rows_written != self.num_items:
            raise IncompleteCacheError(f"{self.partial}: only {self.rows_written} of "
                                       f"{self.num_items} rows written")
        self.file.attrs["complete"] = True
        self.file.close()
        os.replace(self.partial, self.path)
        return self.path

    def close(self) -> None:
        """Close without finishing (the partial file stays resumable)."""
        if self.file.id.valid:
            self.file.close()

    def __enter__(self) -> "_Writer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class ImageCacheWriter(_Writer):
    """Writes ``[N, T, D]`` image tokens in row order; ids and paths are written up front."""

    def __init__(self, path: str | os.PathLike, attrs: CacheAttrs, ids: Sequence[str],
                 paths: Sequence[str], with_boxes: bool = False, overwrite: bool = False) -> None:
        if attrs.modality != "image":
            raise ValueError("ImageCacheWriter needs modality='image'")
        if len(ids) != attrs.num_items or len(paths) != attrs.num_items:
            raise ValueError(f"{len(ids)} ids / {len(paths)} paths for {attrs.num_items} items")
        self._ids, self._paths, self._with_boxes = list(ids), list(paths), with_boxes
        super().__init__(path, attrs, overwrite)
        if self._ids != [s.decode() if isinstance(s, bytes) else s for s in self.file["ids"][:]]:
            self.close()
            raise CacheMismatchError(f"{self.partial}: the interrupted run covered other image ids; "
                                     "pass --overwrite to start again")

    def _create_datasets(self) -> None:
        n, t, d = self.attrs.num_items, self.attrs.num_tokens, self.attrs.dim
        _create(self.file, "tokens", (n, t, d), STORAGE_DTYPE)
        if self.attrs.views > 1:
            _create(self.file, "view_tokens", (n, self.attrs.views - 1, t, d), STORAGE_DTYPE)
        _create(self.file, "lengths", (n,), np.int32)
        _create(self.file, "ids", (n,), h5py.string_dtype(), self._ids)
        _create(self.file, "paths", (n,), h5py.string_dtype(), self._paths)
        if self._with_boxes:
            _create(self.file, "boxes", (n, t, 4), np.float32)
            _create(self.file, "image_wh", (n, 2), np.int32)

    def append(self, tokens: np.ndarray, lengths: np.ndarray | None = None,
               boxes: np.ndarray | None = None, image_wh: np.ndarray | None = None,
               views: np.ndarray | None = None) -> None:
        """Write the next ``B`` rows (tokens ``[B, t<=T, D]``, zero-padded to T) and commit; a cache
        of V > 1 views takes the other views of the same rows, ``views`` ``[B, V-1, T, D]``."""
        start = self.rows_written
        b, t = tokens.shape[0], tokens.shape[1]
        if start + b > self.num_items:
            raise ValueError(f"{self.partial}: {start + b} rows exceed the {self.num_items} planned")
        if t > self.attrs.num_tokens or tokens.shape[2] != self.attrs.dim:
            raise ValueError(f"tokens of shape {tokens.shape} do not fit T={self.attrs.num_tokens}, "
                             f"D={self.attrs.dim}")
        wanted = (b, self.attrs.views - 1, self.attrs.num_tokens, self.attrs.dim)
        if (views is None) != (self.attrs.views == 1) or (views is not None
                                                          and views.shape != wanted):
            raise ValueError(f"this cache holds {self.attrs.views} views per photo: other views "
                             f"{wanted} expected, got {None if views is None else views.shape}")
        _check_finite(tokens, self.partial, start)
        if views is not None:
            _check_finite(views, self.partial, start)
        if t < self.attrs.num_tokens:
            padded = np.zeros((b, self.attrs.num_tokens, self.attrs.dim), STORAGE_DTYPE)
            padded[:, :t] = tokens
            tokens = padded
        lengths = np.full(b, t, np.int32) if lengths is None else np.asarray(lengths, np.int32)
        self.file["tokens"][start:start + b] = tokens.astype(STORAGE_DTYPE, copy=False)
        if views is not None:
            self.file["view_tokens"][start:start + b] = views.astype(STORAGE_DTYPE, copy=False)
        self.file["lengths"][start:start + b] = lengths
        if self._with_boxes:
            if boxes is None or image_wh is None:
                raise ValueError("this cache stores boxes: pass boxes and image_wh")
            self.file["boxes"][start:start + b, :boxes.shape[1]] = boxes
            self.file["image_wh"][start:start + b] = image_wh
        self._commit(start + b)


class TextCacheWriter(_Writer):
    """Writes ragged caption token states; token ids, offsets, captions and image rows up front."""

    def __init__(self, path: str | os.PathLike, attrs: CacheAttrs, input_ids: Sequence[Sequence[int]],
                 captions: Sequence[str], image_index: Sequence[int], overwrite: bool = False) -> None:
        if attrs.modality != "text":
            raise ValueError("TextCacheWriter needs modality='text'")
        n = attrs.num_items
        if not (len(input_ids) == len(captions) == len(image_index) == n):
            raise ValueError(f"{len(input_ids)} token lists / {len(captions)} captions / "
                             f"{len(image_index)} image rows for {n} items")
        lengths = np.array([len(ids) for ids in input_ids], np.int64)
        if n and lengths.min() == 0:
            raise InputError(f"caption row {int(np.argmin(lengths))} has no tokens")
        self._offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self._input_ids = (np.concatenate([np.asarray(i, np.int32) for i in input_ids])
                           if n else np.zeros(0, np.int32))
        self._captions, self._image_index = list(captions), np.asarray(image_index, np.int64)
        super().__init__(path, attrs, overwrite)
        if not np.array_equal(self.file["offsets"][:], self._offsets):
            self.close()
            raise CacheMismatchError(f"{self.partial}: the interrupted run tokenised other captions; "
                                     "pass --overwrite to start again")

    def _create_datasets(self) -> None:
        n, total = self.attrs.num_items, int(self._offsets[-1])
        _create(self.file, "tokens", (total, self.attrs.dim), STORAGE_DTYPE)
        _create(self.file, "offsets", (n + 1,), np.int64, self._offsets)
        _create(self.file, "input_ids", (total,), np.int32, self._input_ids)
        _create(self.file, "image_index", (n,), np.int64, self._image_index)
        _create(self.file, "captions", (n,), h5py.string_dtype(), self._captions)

    def token_lengths(self, start: int, stop: int) -> np.ndarray:
        """Token counts of caption rows ``start:stop`` (what ``append`` expects per row)."""
        return np.diff(self._offsets[start:stop + 1])

    def input_ids_rows(self, start: int, stop: int) -> list[np.ndarray]:
        """Token ids of caption rows ``start:stop`` as written up front."""
        return [self._input_ids[self._offsets[i]:self._offsets[i + 1]] for i in range(start, stop)]

    def append(self, states: Sequence[np.ndarray]) -> None:
        """Write the token states ``[L_i, D]`` of the next captions, in order, and commit."""
        start, b = self.rows_written, len(states)
        if start + b > self.num_items:
            raise ValueError(f"{self.partial}: {start + b} rows exceed the {self.num_items} planned")
        expected = self.token_lengths(start, start + b)
        got = np.array([s.shape[0] for s in states])
        if not np.array_equal(expected, got):
            raise ValueError(f"token state lengths {got.tolist()} differ from the tokenised "
                             f"lengths {expected.tolist()}")
        flat = np.concatenate(states).astype(STORAGE_DTYPE, copy=False)
        _check_finite(flat, self.partial, start)
        self.file["tokens"][self._offsets[start]:self._offsets[start + b]] = flat
        self._commit(start + b)


# ------------------------------------------------------------------------------------------ reading


def _memmap(path: Path, dset: h5py.Dataset) -> np.ndarray | None:
    """A read-only memmap over a contiguous, allocated dataset, or None if it has no fixed offset."""
    offset = dset.id.get_offset()
    if offset is None or dset.size == 0:
        return None
    return np.memmap(path, dtype=dset.dtype, mode="r", offset=offset, shape=dset.shape)


class _Cache:
    """Common reader logic: attributes, completeness, lazy per-process HDF5 handles."""

    modality: str = ""

    def __init__(self, path: str | os.PathLike, allow_incomplete: bool = False) -> None:
        self.path = Path(path)
        if not self.path.exists():
            hint = " (an unfinished extraction left a .partial file)" if partial_path(
                self.path).exists() else ""
            raise InputError(f"{self.path}: cache file not found{hint}")
        try:
            with open_h5(self.path) as f:
                self.attrs = CacheAttrs.from_hdf5(f.attrs, self.path)
                self.complete = bool(f.attrs.get("complete", False))
                self.rows_written = int(f.attrs.get("rows_written", 0))
                self.schema_version = int(f.attrs.get("schema_version", 0))
                if self.attrs.modality != self.modality:
                    raise CacheMismatchError(f"{self.path}: a {self.attrs.modality} cache, expected "
                                             f"a {self.modality} cache")
                self._load_index(f)
        except OSError as exc:
            raise IncompleteCacheError(f"{self.path}: not a readable HDF5 file ({exc})") from exc
        if self.schema_version != SCHEMA_VERSION:
            raise CacheMismatchError(f"{self.path}: schema version {self.schema_version}, this tool "
                                     f"reads version {SCHEMA_VERSION}")
        if not allow_incomplete and (not self.complete or self.rows_written != self.attrs.num_items):
            raise IncompleteCacheError(f"{self.path}: incomplete cache ({self.rows_written} of "
                                       f"{self.attrs.num_items} rows written)")
        self._pid: int | None = None
        self._arrays: dict[str, Any] = {}

    def _load_index(self, f: h5py.File) -> None:
        raise NotImplementedError

    def __len__(self) -> int:
        return self.attrs.num_items

    @property
    def tokens(self) -> Any:
        """The token array (memmap when possible); reopened after a fork (DataLoader workers)."""
        return self._array("tokens")

    def _array(self, name: str) -> Any:
        """Dataset ``name`` as a memmap when possible (else the h5py dataset), opened once per
        process."""
        if self._pid != os.getpid():
            self._arrays, self._pid = {}, os.getpid()
        if name not in self._arrays:
            with open_h5(self.path) as f:
                mm = _memmap(self.path, f[name])
            self._arrays[name] = mm if mm is not None else open_h5(self.path)[name]
        return self._arrays[name]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_pid"], state["_arrays"] = None, {}
        return state

    def require(self, **expected: Any) -> None:
        """Raise CacheMismatchError naming the file if an attribute differs from ``expected``."""
        diff = [f"{k} is {getattr(self.attrs, k)!r}, expected {v!r}"
                for k, v in expected.items() if getattr(self.attrs, k) != v]
        if diff:
            raise CacheMismatchError(f"{self.path}: {'; '.join(diff)}")


class ImageCache(_Cache):
    """Reader of an image cache: ``read(rows)`` returns fp16 tokens ``[B, T, D]`` and lengths."""

    modality = "image"

    def _load_index(self, f: h5py.File) -> None:
        self.lengths = f["lengths"][:]
        self.ids = [s.decode() for s in f["ids"][:]]
        self.paths = [s.decode() for s in f["paths"][:]]
        self.has_boxes = "boxes" in f

    def read(self, rows: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Tokens ``[B, T, D]`` (fp16) and valid lengths ``[B]`` of the given rows, in that order."""
        rows = np.asarray(rows, np.int64)
        tokens = self.tokens
        if isinstance(tokens, np.ndarray):
            out = tokens[rows]
        else:  # h5py fallback: sorted unique reads, then reorder
            uniq, inverse = np.unique(rows, return_inverse=True)
            out = tokens[uniq][inverse]
        return np.ascontiguousarray(out), self.lengths[rows]

    @property
    def num_views(self) -> int:
        """Views per photo: 1 (``tokens``, the centre view) or V (`read_views`)."""
        return self.attrs.views

    @property
    def view_tokens(self) -> Any:
        """The other views ``[N, V-1, T, D]`` of a cache of several views (memmap when possible)."""
        if self.num_views == 1:
            raise CacheMismatchError(f"{self.path}: a cache of one view per photo (no view_tokens)")
        return self._array("view_tokens")

    def read_views(self, rows: Sequence[int] | np.ndarray,
                   views: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Tokens ``[B, T, D]`` (fp16) and lengths ``[B]`` of view ``views[i]`` of row ``rows[i]``
        (view 0: the centre view, `read`)."""
        rows, views = np.asarray(rows, np.int64), np.asarray(views, np.int64)
        if views.size and (views.min() < 0 or views.max() >= self.num_views):
            raise ValueError(f"{self.path}: views {views.min()}..{views.max()} asked, the cache "
                             f"holds {self.num_views}")
        out, lengths = self.read(rows)
        other = np.flatnonzero(views > 0)
        if other.size:
            table = self.view_tokens
            if isinstance(table, np.ndarray):
                out[other] = table[rows[other], views[other] - 1]
            else:
                for i in other:
                    out[i] = table[rows[i], views[i] - 1]
        return out, lengths

    def read_boxes(self, rows: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Boxes ``[B, T, 4]`` and image sizes ``[B, 2]`` (region caches only)."""
        if not self.has_boxes:
            raise CacheMismatchError(f"{self.path}: this cache has no boxes")
        rows = np.asarray(rows, np.int64)
        with open_h5(self.path) as f:
            uniq, inverse = np.unique(rows, return_inverse=True)
            return f["boxes"][uniq][inverse], f["image_wh"][uniq][inverse]


class TextCache(_Cache):
    """Reader of a ragged caption cache: ``read(rows)`` returns padded fp16 states and lengths."""

    modality = "text"

    def _load_index(self, f: h5py.File) -> None:
        self.offsets = f["offsets"][:]
        self.lengths = np.diff(self.offsets)
        self.image_index = f["image_index"][:]
        self._input_ids = f["input_ids"][:]

    @property
    def captions(self) -> list[str]:
        with open_h5(self.path) as f:
            return [s.decode() for s in f["captions"][:]]

    def input_ids(self, row: int) -> np.ndarray:
        return self._input_ids[self.offsets[row]:self.offsets[row + 1]]

    def read(self, rows: Sequence[int] | np.ndarray,
             pad_to: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Token states padded to the longest row (or ``pad_to``) ``[B, L, D]`` and lengths ``[B]``."""
        rows = np.asarray(rows, np.int64)
        lengths = self.lengths[rows]
        width = int(lengths.max(initial=0)) if pad_to is None else pad_to
        out = np.zeros((len(rows), width, self.attrs.dim), STORAGE_DTYPE)
        tokens = self.tokens
        for i, row in enumerate(rows):
            n = min(int(lengths[i]), width)
            out[i, :n] = tokens[self.offsets[row]:self.offsets[row] + n]
        return out, np.minimum(lengths, width)


_READERS = {"image": ImageCache, "text": TextCache}


def open_cache(path: str | os.PathLike, allow_incomplete: bool = False) -> ImageCache | TextCache:
    """Open an image or text cache, chosen by the file's ``modality`` attribute."""
    path = Path(path)
    if not path.exists():
        hint = (" (an unfinished extraction left a .partial file)"
                if partial_path(path).exists() else "")
        raise InputError(f"{path}: cache file not found{hint}")
    try:
        with open_h5(path) as f:
            modality = f.attrs.get("modality")
    except OSError as exc:
        raise IncompleteCacheError(f"{path}: not a readable HDF5 file ({exc})") from exc
    if modality not in _READERS:
        raise IncompleteCacheError(f"{path}: not a feature cache (no modality attribute)")
    return _READERS[modality](path, allow_incomplete=allow_incomplete)


# ------------------------------------------------------------------------------------------ shards


def unsharded(attrs: CacheAttrs) -> CacheAttrs:
    """The attributes the whole (merged) file of a shard has."""
    return dataclasses.replace(attrs, num_items=attrs.total_items, shard_start=0, shard_stop=-1,
                               total_items=-1)


def is_shard(attrs: CacheAttrs) -> bool:
    """Whether a file holds only a block of rows of a sharded extraction."""
    return attrs.total_items >= 0


def merge_shards(shard_paths: Sequence[str | os.PathLike], out_path: str | os.PathLike,
                 overwrite: bool = False, chunk_rows: int = 256) -> Path:
    """Join complete shard files (contiguous row blocks) into one normal cache file at ``out_path``.

    The shards must come from the same extraction (identical identity attributes apart from their
    row range) and cover every row exactly once; each problem raises an error naming the file. The
    merged file is written like any cache (``.partial``, resumable, renamed at the end) and equals
    the file an unsharded run writes. Returns the final path.
    """
    if not shard_paths:
        raise InputError(f"{out_path}: no shard files to merge")
    readers = [open_cache(p) for p in shard_paths]
    for reader in readers:
        if not is_shard(reader.attrs):
            raise InputError(f"{reader.path}: not a shard (no total_items attribute)")
    readers.sort(key=lambda r: r.attrs.shard_start)
    whole = unsharded(readers[0].attrs)
    expected = 0
    for reader in readers:
        diff = unsharded(reader.attrs).identity_diff(whole)
        if diff:
            raise CacheMismatchError(f"{reader.path}: shard of a different extraction than "
                                     f"{readers[0].path} ({'; '.join(diff)})")
        a = reader.attrs
        if a.shard_start != expected:
            problem = "overlaps the previous shard" if a.shard_start < expected else (
                f"rows {expected}..{a.shard_start - 1} are in no shard")
            raise InputError(f"{reader.path}: starts at row {a.shard_start}: {problem}")
        if a.shard_stop - a.shard_start != a.num_items:
            raise IncompleteCacheError(f"{reader.path}: holds {a.num_items} rows for the range "
                                       f"{a.shard_start}..{a.shard_stop - 1}")
        expected = a.shard_stop
    if expected != whole.num_items:
        raise InputError(f"{out_path}: the shards cover rows 0..{expected - 1} of "
                         f"{whole.num_items}; rows {expected}..{whole.num_items - 1} are missing")
    if whole.modality == "image":
        _merge_images(readers, whole, Path(out_path), overwrite, chunk_rows)
    else:
        _merge_texts(readers, whole, Path(out_path), overwrite, chunk_rows)
    return Path(out_path)


def _shard_chunks(readers: Sequence[_Cache], done: int,
                  chunk_rows: int) -> Iterator[tuple[Any, int, int]]:
    """(reader, local start, local stop) blocks of the rows not yet written, in order."""
    for reader in readers:
        a = reader.attrs
        start = max(done, a.shard_start) - a.shard_start
        for lo in range(start, a.num_items, chunk_rows):
            yield reader, lo, min(lo + chunk_rows, a.num_items)


def _merge_images(readers: Sequence[ImageCache], whole: CacheAttrs, out: Path, overwrite: bool,
                  chunk_rows: int) -> None:
    ids = [i for r in readers for i in r.ids]
    paths = [p for r in readers for p in r.paths]
    boxes = readers[0].has_boxes
    with ImageCacheWriter(out, whole, ids, paths, with_boxes=boxes, overwrite=overwrite) as writer:
        for reader, lo, hi in _shard_chunks(readers, writer.rows_written, chunk_rows):
            tokens, lengths = reader.read(np.arange(lo, hi))
            extra = reader.read_boxes(np.arange(lo, hi)) if boxes else (None, None)
            views = np.asarray(reader.view_tokens[lo:hi]) if whole.views > 1 else None
            writer.append(tokens, lengths, *extra, views=views)
        writer.finish()


def _merge_texts(readers: Sequence[TextCache], whole: CacheAttrs, out: Path, overwrite: bool,
                 chunk_rows: int) -> None:
    input_ids = [r.input_ids(i) for r in readers for i in range(len(r))]
    captions = [c for r in readers for c in r.captions]
    image_index = np.concatenate([r.image_index for r in readers])
    with TextCacheWriter(out, whole, input_ids, captions, image_index,
                         overwrite=overwrite) as writer:
        for reader, lo, hi in _shard_chunks(readers, writer.rows_written, chunk_rows):
            flat = np.asarray(reader.tokens[reader.offsets[lo]:reader.offsets[hi]])
            writer.append(np.split(flat, reader.offsets[lo + 1:hi] - reader.offsets[lo]))
        writer.finish()


# ------------------------------------------------------------------------------------------ describe


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """Schema, attributes and a completeness/validity verdict of any cache file (for ``cli info``).

    A ``.partial`` file (being written, or left by an interrupted run) is read without the file lock
    and reported with ``partial`` set and the rows committed so far.
    """
    path = Path(path)
    report: dict[str, Any] = {"path": str(path), "valid": False,
                              "partial": path.name.endswith(PARTIAL_SUFFIX)}
    try:
        with open_h5(path) as f:
            report["datasets"] = {name: {"shape": list(d.shape), "dtype": str(d.dtype)}
                                  for name, d in f.items()}
            report["attributes"] = {k: (v.item() if isinstance(v, np.generic) else v)
                                    for k, v in f.attrs.items()}
    except OSError as exc:
        report["problem"] = f"not a readable HDF5 file ({exc})"
        return report
    try:
        reader = open_cache(path, allow_incomplete=True)
    except InputError as exc:
        report["problem"] = str(exc)
        return report
    if is_shard(reader.attrs):
        report["shard"] = (f"rows {reader.attrs.shard_start}..{reader.attrs.shard_stop - 1} of "
                           f"{reader.attrs.total_items} (join the shards with `cli extract --merge`)")
    report["weights_note"] = reader.attrs.weights_note
    report["views"] = reader.attrs.views
    if reader.attrs.modality == "image":
        report["views_line"] = views_line(reader.attrs)
    report["complete"] = reader.complete and reader.rows_written == reader.attrs.num_items
    report["rows_written"] = reader.rows_written
    rows = f"{reader.rows_written} of {reader.attrs.num_items} rows"
    if report["complete"]:
        report["valid"] = True
    elif report["partial"]:
        report["problem"] = (f"partial file: {rows} committed so far (an extraction is writing it, "
                             "or was interrupted: rerun the same command to resume)")
    else:
        report["problem"] = f"incomplete: {rows} written (resume the extraction with the same command)"
    return report


def views_line(attrs: CacheAttrs) -> str:
    """What a cache holds per photo, in words (``cli info``, notes of one-view readers)."""
    if attrs.views == 1:
        return "1 view per photo (the centre view)"
    aug = attrs.augmentation
    how = ", ".join(f"{k} {aug[k]}" for k in ("crop_scale", "flip", "seed") if k in aug)
    return (f"{attrs.views} views per photo: view 0 the centre view, views 1..{attrs.views - 1} "
            f"augmented ({aug.get('transform', 'augmented')}{'; ' + how if how else ''})")


def centre_view_note(cache: "ImageCache", reader: str) -> str | None:
    """The note a reader of one view per photo prints for a cache of several (None otherwise)."""
    if cache.num_views == 1:
        return None
    return (f"note: {cache.path} holds {cache.num_views} views per photo; {reader} reads the "
            "centre view (view 0) only")
