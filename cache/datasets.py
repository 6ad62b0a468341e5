"""Torch-side access to caches: token batches for encoding, caption-indexed pairs for training.

Training is indexed by caption, as in every reference implementation: an epoch visits every caption
of the split once (each image once per caption: five times in the standard splits), and a batch
holds ``B`` captions plus the image of each. Batches are read whole (one memmap read of the sorted
unique image rows, one of the sorted caption rows), so a DataLoader item is a batch, not a sample.

Feature-level augmentation replaces the input-level augmentation the references apply before their
backbones (impossible on cached features): each image token (region or patch) and each caption token
state is dropped independently with a probability, never a prefix token (CLS, registers, [CLS]) or
suffix token ([SEP]), and always keeping at least one of the droppable tokens. The decision for a
token is a hash of (seed, epoch, caption row, side, position), so it is deterministic, independent of
the batch composition, of the number of DataLoader workers and of the number of ranks.

An image cache of several views per photo (``cli extract --views V``) gives training input-level
augmentation after all: each epoch reads one view of each photo (`view_of`), the same for every
caption of the photo, whatever the side's source (cached tokens or a tail on them). Encoding
(`token_batches`: dev, test, eval) reads the centre view.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from cache.batch import TokenBatch
from cache.errors import InputError
from cache.store import ImageCache, TextCache

PRELOAD_CHOICES = ("none", "ram", "device", "auto")
_AUTO_FRACTION = 0.5  # preload only when the split takes at most this fraction of free memory


def to_token_batch(tokens: np.ndarray, lengths: np.ndarray) -> TokenBatch:
    """Wrap padded fp16 tokens ``[B, T, D]`` and valid lengths ``[B]`` as a TokenBatch (CPU)."""
    tokens_t = torch.from_numpy(np.ascontiguousarray(tokens))
    lengths_t = torch.from_numpy(np.asarray(lengths, np.int64))
    mask = torch.arange(tokens_t.shape[1]).unsqueeze(0) < lengths_t.unsqueeze(1)
    return TokenBatch(tokens_t, mask)


def token_batches(cache: ImageCache | TextCache, batch_size: int,
                  rows: Sequence[int] | np.ndarray | None = None) -> Iterator[tuple[np.ndarray, TokenBatch]]:
    """Consecutive batches of ``rows`` (default: every row once, in order) as (rows, TokenBatch)."""
    rows = np.arange(len(cache)) if rows is None else np.asarray(rows, np.int64)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        tokens, lengths = cache.read(chunk)
        yield chunk, to_token_batch(tokens, lengths)


# ------------------------------------------------------------------------------ epoch order


def one_caption_per_image(caption_image: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """One caption row per image (image order), drawn uniformly among the image's captions with
    a generator seeded by (seed, epoch)."""
    caption_image = np.asarray(caption_image, np.int64)
    by_image = np.argsort(caption_image, kind="stable")
    counts = np.bincount(caption_image)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    pick = np.random.default_rng([seed, epoch, 1]).integers(0, counts)
    return by_image[starts + pick]


def caption_batches(num_captions: int, batch_size: int, seed: int, epoch: int, rank: int = 0,
                    world_size: int = 1, caption_image: np.ndarray | None = None) -> list[np.ndarray]:
    """Caption rows of each batch of one epoch, for one rank.

    The global order is a permutation seeded by (seed, epoch) of every caption, or, with
    ``caption_image`` (an epoch over images), of one caption per image
    (`one_caption_per_image`); it is cut into global batches of ``batch_size`` captions and the
    last incomplete batch is dropped (as the references do). With several ranks, rank ``r`` takes
    the ``r``-th contiguous slice of each global batch, so the ranks together see exactly the
    batches one process with the same global batch size sees.
    """
    if batch_size % world_size:
        raise InputError(f"the global batch size {batch_size} is not divisible by the "
                         f"{world_size} processes")
    rows = (np.arange(num_captions) if caption_image is None
            else one_caption_per_image(caption_image, seed, epoch))
    unit = "captions" if caption_image is None else "images"
    if len(rows) < batch_size:
        raise InputError(f"the training split has {len(rows)} {unit}, fewer than one batch "
                         f"of {batch_size}; lower optim.batch_size")
    order = rows[np.random.default_rng([seed, epoch]).permutation(len(rows))]
    local = batch_size // world_size
    steps = len(rows) // batch_size
    return [order[s * batch_size + rank * local:s * batch_size + (rank + 1) * local]
            for s in range(steps)]


class EpochBatches(torch.utils.data.Sampler):
    """Sampler of ``(epoch, caption rows)`` items for a DataLoader with ``batch_size=None``; with
    ``caption_image``, an epoch visits every image once (one random caption each) instead of
    every caption.

    Call ``set_epoch`` before iterating; iteration order depends only on (seed, epoch, rank)."""

    def __init__(self, num_captions: int, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, caption_image: np.ndarray | None = None) -> None:
        self.num_captions, self.batch_size, self.seed = num_captions, batch_size, seed
        self.rank, self.world_size, self.epoch = rank, world_size, 0
        self.caption_image = caption_image
        self.num_items = num_captions if caption_image is None else int(np.max(caption_image)) + 1
        caption_batches(num_captions, batch_size, seed, 0, rank, world_size,
                        caption_image)  # validate early

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_items // self.batch_size

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        for rows in caption_batches(self.num_captions, self.batch_size, self.seed, self.epoch,
                                    self.rank, self.world_size, self.caption_image):
            yield self.epoch, rows


# ------------------------------------------------------------------------------ token drop

_SIDE = {"image": 1, "text": 2}
_VIEW_KEY = 3


def view_of(seed: int, epoch: int, rows: np.ndarray, num_views: int) -> np.ndarray:
    """The view training reads of each photo ``rows`` in ``epoch``: ``(offset + epoch) % V`` with
    an offset per (seed, photo), so a photo takes another view each epoch and all V in V epochs,
    the photos out of step with each other."""
    rows = np.asarray(rows, np.int64)
    if num_views == 1:
        return np.zeros(len(rows), np.int64)
    offset = (hash_uniform([seed, _VIEW_KEY, rows]) * num_views).astype(np.int64)
    return (offset + epoch) % num_views


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def hash_uniform(keys: Sequence[int | np.ndarray]) -> np.ndarray:
    """Uniform numbers in [0, 1) that depend only on the (broadcast) integer keys."""
    with np.errstate(over="ignore"):
        h = np.zeros((), np.uint64)
        for key in keys:
            k = np.asarray(key)
            k = k if k.dtype == np.uint64 else k.astype(np.int64).view(np.uint64)
            h = _mix(h ^ k ^ np.uint64(0x9E3779B97F4A7C15))
        return (h >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


@dataclass(frozen=True)
class TokenDrop:
    """Random drop of one side's tokens: probability ``p`` per token between the ``prefix`` first and
    the ``suffix`` last valid tokens, which are never dropped; at least one droppable token stays."""

    p: float = 0.0
    prefix: int = 0
    suffix: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.p < 1.0:
            raise InputError(f"token drop probability must be in [0, 1), got {self.p}")

    def keep_order(self, lengths: np.ndarray, keys: Sequence[int | np.ndarray],
                   width: int) -> tuple[np.ndarray, np.ndarray]:
        """Gather indices ``[B, W']`` (kept positions first, in order) and the new lengths ``[B]``.

        ``keys`` identify each row (broadcast against ``[B, 1]``), e.g. (seed, epoch, side, rows)."""
        lengths = np.asarray(lengths, np.int64)
        pos = np.arange(width)[None, :]
        valid = pos < lengths[:, None]
        droppable = valid & (pos >= self.prefix) & (pos < lengths[:, None] - self.suffix)
        if self.p > 0:
            u = hash_uniform([*(np.asarray(k).reshape(-1, 1) if np.ndim(k) else k for k in keys), pos])
            drop = droppable & (u < self.p)
            # keep at least one droppable token: the one with the largest draw
            emptied = droppable.any(1) & ~(droppable & ~drop).any(1)
            if emptied.any():
                best = np.where(droppable, u, -1.0).argmax(1)
                drop[emptied, best[emptied]] = False
            keep = valid & ~drop
        else:
            keep = valid
        new_lengths = keep.sum(1)
        order = np.argsort(~keep, axis=1, kind="stable")[:, :max(int(new_lengths.max(initial=0)), 1)]
        return order, new_lengths


def _gather(table: np.ndarray | Tensor, starts: np.ndarray, order: np.ndarray,
            lengths: np.ndarray, dtype: np.dtype | None = None) -> TokenBatch:
    """Batch row ``b`` = rows ``starts[b] + order[b, :lengths[b]]`` of a token table ``[M, D]``,
    zero-padded, with its mask. One fancy-indexing copy (NumPy on the CPU: ~20x faster than
    torch.gather on fp16; torch indexing for tables held on a device). ``dtype`` converts NumPy
    batches (the stored fp16 otherwise)."""
    mask = np.arange(order.shape[1])[None, :] < lengths[:, None]
    index = np.where(mask, starts[:, None] + order, 0)       # padding reads row 0, zeroed below
    if isinstance(table, np.ndarray):
        out = table[index]
        out[~mask] = 0
        if dtype is not None:
            out = out.astype(dtype)
        return TokenBatch(torch.from_numpy(out), torch.from_numpy(mask))
    index_t = torch.from_numpy(index).to(table.device, non_blocking=True)
    mask_t = torch.from_numpy(mask).to(table.device, non_blocking=True)
    out_t = table[index_t]
    return TokenBatch(out_t.masked_fill_(~mask_t.unsqueeze(-1), 0), mask_t)


# ------------------------------------------------------------------------------ token tables
#
# A table reader returns, for the rows of a batch, a token table ``[M, D]`` and the table row where
# each batch row's tokens start; ``_gather`` then copies the kept positions in one go. (Not to be
# confused with the token sources of ``heads.sources``, which act on the gathered batches.)


class MemmapTable:
    """Reads each batch through the memmap readers: sorted unique rows, nothing kept in memory."""

    def __init__(self, images: ImageCache, texts: TextCache) -> None:
        self.image_cache, self.text_cache = images, texts

    def images(self, rows: np.ndarray, views: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        num_views = self.image_cache.num_views
        uniq, inverse = np.unique(rows * num_views + views, return_inverse=True)
        tokens, _ = self.image_cache.read_views(uniq // num_views, uniq % num_views)
        return tokens.reshape(-1, tokens.shape[2]), inverse.reshape(-1) * tokens.shape[1]

    def texts(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        by_row = np.argsort(rows, kind="stable")
        tokens, _ = self.text_cache.read(rows[by_row])
        slot = np.empty_like(by_row)
        slot[by_row] = np.arange(len(rows))
        return tokens.reshape(-1, tokens.shape[2]), slot * tokens.shape[1]


class PreloadedTable:
    """A split held whole in RAM (NumPy) or on a device (torch): batches index it directly."""

    def __init__(self, images: ImageCache, texts: TextCache, device: torch.device | None = None) -> None:
        image_tokens = np.array(images.tokens)
        if images.num_views > 1:        # [N, V, T, D]: row-major, view 0 the centre view
            image_tokens = np.concatenate([image_tokens[:, None], images.view_tokens], axis=1)
            image_tokens = image_tokens.reshape(-1, *image_tokens.shape[2:])
        self.num_views = images.num_views
        self.image_width = image_tokens.shape[1]
        image_table = image_tokens.reshape(-1, image_tokens.shape[2])
        text_table = np.array(texts.tokens)
        self.offsets = np.asarray(texts.offsets, np.int64)
        if device is None or device.type == "cpu":
            self.image_table: np.ndarray | Tensor = image_table
            self.text_table: np.ndarray | Tensor = text_table
        else:
            self.image_table = torch.from_numpy(image_table).to(device)
            self.text_table = torch.from_numpy(text_table).to(device)

    def images(self, rows: np.ndarray, views: np.ndarray) -> tuple[np.ndarray | Tensor, np.ndarray]:
        return self.image_table, (rows * self.num_views + views) * self.image_width

    def texts(self, rows: np.ndarray) -> tuple[np.ndarray | Tensor, np.ndarray]:
        return self.text_table, self.offsets[rows]


def split_bytes(images: ImageCache, texts: TextCache) -> int:
    """Bytes the token arrays of an image (every view) and a text cache take (fp16)."""
    return (int(np.prod(images.tokens.shape)) * images.num_views * 2
            + int(np.prod(texts.tokens.shape)) * 2)


def _available_ram() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def resolve_preload(mode: str, images: ImageCache, texts: TextCache,
                    device: torch.device) -> tuple[str, str]:
    """The preload actually used for ``mode`` and a sentence saying why (for the log)."""
    if mode not in PRELOAD_CHOICES:
        raise InputError(f"data.preload must be one of {PRELOAD_CHOICES}, got {mode!r}")
    need = split_bytes(images, texts)
    size = f"{need / 2**20:.0f} MiB"
    if mode == "device" and device.type == "cpu":
        return "ram", f"preload 'device' on a CPU run keeps the split ({size}) in RAM"
    if mode != "auto":
        return mode, f"preload {mode!r} ({size})"
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if need <= _AUTO_FRACTION * free:
            return "device", f"preload auto: the split ({size}) fits on {device}"
    if need <= _AUTO_FRACTION * _available_ram():
        return "ram", f"preload auto: the split ({size}) fits in RAM"
    return "none", f"preload auto: the split ({size}) is read per batch from the memmap"


# ------------------------------------------------------------------------------ training pairs


class PairBatches(torch.utils.data.Dataset):
    """Caption-indexed training pairs, one item per batch.

    ``dataset[(epoch, caption_rows)]`` returns ``(images, texts, image_ids)``: image token batch
    ``[B, T', D]``, caption token batch ``[B, L', D]`` (padded, masked, after token drop)
    and the image row of each caption ``[B]`` (for same-image masking in the loss). Row ``i`` of the
    images is the image of caption ``i``, in the view `view_of` gives it this epoch (an image
    cache of several views). ``float32=True`` converts the tokens in the loader (worker
    processes when there are some): what a CPU run wants; a GPU run moves fp16 and converts there.
    A side with a ``readers`` entry (``{"image": r}``) reads its batch with
    ``r.read(rows, epoch)`` instead (an end-to-end side: photos or word-piece ids, see
    ``heads.raw_inputs``); its cached tokens are not read.
    """

    def __init__(self, images: ImageCache, texts: TextCache, seed: int = 0,
                 image_drop: float = 0.0, text_drop: float = 0.0, preload: str = "none",
                 device: torch.device | None = None, float32: bool = False,
                 readers: dict[str, Any] | None = None) -> None:
        check_pairing(images, texts)
        self.images, self.texts, self.seed = images, texts, seed
        self.readers = {side: r for side, r in (readers or {}).items() if r is not None}
        self.image_drop = TokenDrop(image_drop, images.attrs.prefix_tokens, images.attrs.suffix_tokens)
        self.text_drop = TokenDrop(text_drop, texts.attrs.prefix_tokens, texts.attrs.suffix_tokens)
        if preload == "none":
            self.table: MemmapTable | PreloadedTable = MemmapTable(images, texts)
        elif preload in ("ram", "device"):
            self.table = PreloadedTable(images, texts, device if preload == "device" else None)
        else:
            raise InputError(f"preload must be none, ram or device here, got {preload!r}")
        self.on_device = preload == "device"
        self.dtype = np.dtype(np.float32) if float32 else None
        self.image_lengths = np.asarray(images.lengths, np.int64)
        self.text_lengths = np.asarray(texts.lengths, np.int64)
        self.image_index = np.asarray(texts.image_index, np.int64)

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, item: tuple[int, np.ndarray]) -> tuple[Any, Any, Tensor]:
        epoch, rows = item
        rows = np.asarray(rows, np.int64)
        image_rows = self.image_index[rows]
        views = view_of(self.seed, epoch, image_rows, self.images.num_views)
        images = self._side("image", image_rows, rows, epoch, self.image_lengths[image_rows],
                            self.image_drop, lambda side_rows: self.table.images(side_rows, views))
        texts = self._side("text", rows, rows, epoch, self.text_lengths[rows], self.text_drop,
                           self.table.texts)
        return images, texts, torch.from_numpy(image_rows)

    def _side(self, side: str, side_rows: np.ndarray, caption_rows: np.ndarray, epoch: int,
              lengths: np.ndarray, drop: TokenDrop, read: Any) -> Any:
        """One side's batch: its reader's, or the cached tokens after token drop (drawn per
        caption row)."""
        if side in self.readers:
            return self.readers[side].read(side_rows, epoch)
        order, width = drop.keep_order(lengths, (self.seed, epoch, _SIDE[side], caption_rows),
                                       int(lengths.max(initial=1)))
        return _gather(*read(side_rows), order, width, self.dtype)


def check_pairing(image_cache: ImageCache, text_cache: TextCache) -> Tensor:
    """The caption -> image rows of a split (training and evaluation), after checking that the
    text cache describes the image cache: same dataset/split attributes (where both are set),
    every caption pointing to an existing image and every image having a caption. Mismatches name
    both files."""
    files = f"{text_cache.path} and {image_cache.path}"
    ia, ta = image_cache.attrs, text_cache.attrs
    for name in ("dataset", "split"):
        if getattr(ia, name) and getattr(ta, name) and getattr(ia, name) != getattr(ta, name):
            raise InputError(f"{files}: not the same {name} ({getattr(ta, name)!r} vs "
                             f"{getattr(ia, name)!r})")
    index = np.asarray(text_cache.image_index, np.int64)
    n_img = len(image_cache)
    if index.size and (index.min() < 0 or index.max() >= n_img):
        row = int(np.nonzero((index < 0) | (index >= n_img))[0][0])
        raise InputError(f"{files}: caption row {row} points to image row {int(index[row])}, but "
                         f"the image cache has {n_img} images")
    counts = np.bincount(index, minlength=n_img)
    if (counts == 0).any():
        missing = np.nonzero(counts == 0)[0]
        raise InputError(f"{files}: {missing.size} of the {n_img} images have no caption (first "
                         f"image rows {missing[:5].tolist()}); are they the same split?")
    return torch.from_numpy(index)


def pair_loader(dataset: PairBatches, sampler: EpochBatches, num_workers: int = 0,
                pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader over whole batches; workers reopen the memmaps in their own process."""
    workers = 0 if dataset.on_device else num_workers
    return torch.utils.data.DataLoader(
        dataset, batch_size=None, sampler=sampler, num_workers=workers,
        pin_memory=pin_memory and not dataset.on_device, persistent_workers=workers > 0)
