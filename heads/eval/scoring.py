"""The scoring engine: encode every cached item once, then fill a similarity matrix block by block.

Embedding branches are scored by one matrix product (in row chunks when the matrix is huge);
interaction branches by ``head.score`` on a block of images x a block of captions, vectorised inside
the block, never a Python loop per caption. Encodings stay on the device; each block of columns is
copied to the host once.

Precision: encoders run under bf16 autocast on CUDA (``amp``) and their outputs are kept as float32;
every score (``head.score`` / ``head.score_pairs``) is computed in float32 with autocast off, so
near-equal scores are not rounded into ties that the pessimistic tie rule of ``heads.eval.metrics``
would count against the ground truth. On the CPU nothing runs in reduced precision by default.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

from cache.errors import InputError
from cache.progress import progress_bar
from cache.store import ImageCache, TextCache
from heads.base import Encoded, cat_encoded, index_encoded, map_encoded, num_items
from heads.model import Retriever, input_batches

DEFAULT_IMAGE_BLOCK = 1000
DEFAULT_CAPTION_BLOCK = 16
DEFAULT_PAIR_BATCH = 4096
EMBEDDING_CHUNK_ELEMENTS = 1 << 26  # one embedding product writes at most this many scores (256 MB)


@contextlib.contextmanager
def inference(head: Retriever, device: torch.device, amp: bool = False) -> Iterator[None]:
    """Eval mode (restored afterwards), no autograd; bf16 autocast on ``device`` when ``amp``,
    autocast explicitly off otherwise (float32 even inside a caller's autocast region)."""
    was_training = head.training
    head.eval()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)
    try:
        with torch.inference_mode(), autocast:
            yield
    finally:
        head.train(was_training)


def default_amp(device: torch.device) -> bool:
    """Encoders run under bf16 autocast on CUDA, in float32 elsewhere."""
    return device.type == "cuda"


def _as_float32(enc: Encoded) -> Encoded:
    """Floating tensors of an encoding as float32 (masks and indices unchanged)."""
    return map_encoded(enc, lambda t: t.float() if t.is_floating_point() else t)


def synchronize(device: torch.device) -> None:
    """Wait for queued device work (for honest timings)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def encode_cache(head: Retriever, cache: ImageCache | TextCache, device: torch.device | str,
                 batch_size: int = 256, progress: bool = False,
                 rows: np.ndarray | None = None, amp: bool | None = None) -> Encoded:
    """Encode every row of an image or text cache once, in order (or only ``rows``, in their
    order); the result stays on ``device``, in float32.

    The fp16 cached tokens are moved to the device as stored and cast to float32 there; the head
    (for a ``heads.model.RetrievalModel``: its token source, e.g. a tuned tail, then its head)
    runs under bf16 autocast when ``amp`` (default: on CUDA). An end-to-end side reads the split's
    photos or captions instead (``heads.model.input_batches``).
    """
    device = torch.device(device)
    amp = default_amp(device) if amp is None else amp
    if len(cache) == 0:
        raise InputError(f"{cache.path}: the cache has no rows to evaluate")
    encode = head.encode_images if cache.attrs.modality == "image" else head.encode_texts
    head.to(device)
    parts: list[Encoded] = []
    count = len(cache) if rows is None else len(rows)
    batches = input_batches(head, cache, batch_size, rows)
    with inference(head, device, amp):
        for _, batch in progress_bar(batches, total=-(-count // batch_size), disable=not progress,
                                     desc=f"encode {cache.attrs.modality}s", leave=False):
            parts.append(_as_float32(encode(batch.to(device, dtype=torch.float32))))
    return cat_encoded(parts)


def similarity_matrix(head: Retriever, img_enc: Encoded, txt_enc: Encoded,
                      device: torch.device | str,
                      image_block: int = DEFAULT_IMAGE_BLOCK,
                      caption_block: int = DEFAULT_CAPTION_BLOCK,
                      progress: bool = False) -> Tensor:
    """Scores ``[N_img, N_cap]`` (float32, computed in float32, on the CPU) of every image against
    every caption, with the head's active branch (``head.score_kind``).

    "embedding": one product ``head.score(images, all captions)`` per chunk of image rows (a single
    product unless the matrix exceeds ``EMBEDDING_CHUNK_ELEMENTS``; the block sizes are ignored).
    "interaction": ``head.score`` on ``image_block`` images x ``caption_block`` captions at a time;
    the block sizes bound the memory of one call and do not change the result.
    """
    device = torch.device(device)
    n_img, n_cap = num_items(img_enc), num_items(txt_enc)
    if image_block < 1 or caption_block < 1:
        raise InputError(f"block sizes must be positive, got image_block={image_block}, "
                         f"caption_block={caption_block}")
    if head.score_kind == "embedding":
        image_block, caption_block = max(1, EMBEDDING_CHUNK_ELEMENTS // max(1, n_cap)), n_cap
    out = torch.empty(n_img, n_cap, dtype=torch.float32)
    image_starts = range(0, n_img, image_block)
    caption_starts = range(0, n_cap, caption_block)
    head.to(device)
    bar = progress_bar(total=len(image_starts) * len(caption_starts), disable=not progress,
                       desc=f"score ({head.score_kind})", leave=False)
    with inference(head, device), bar:
        for c0 in caption_starts:
            texts = _on(index_encoded(txt_enc, slice(c0, c0 + caption_block)), device)
            column = torch.empty(n_img, num_items(texts), dtype=torch.float32, device=device)
            for i0 in image_starts:
                images = _on(index_encoded(img_enc, slice(i0, i0 + image_block)), device)
                column[i0:i0 + image_block] = head.score(images, texts)
                bar.update()
            out[:, c0:c0 + caption_block] = column.cpu()
    return out


def score_pairs(head: Retriever, img_enc: Encoded, txt_enc: Encoded, image_rows: Tensor,
                caption_rows: Tensor, device: torch.device | str,
                pair_batch: int = DEFAULT_PAIR_BATCH, progress: bool = False) -> Tensor:
    """Scores ``[P]`` (float32, computed in float32, on the CPU) of the pairs (image_rows[p],
    caption_rows[p]) with the head's active branch, ``pair_batch`` aligned pairs per
    ``head.score_pairs`` call.

    The row indices go to the device once; each batch gathers its encodings there.
    """
    device = torch.device(device)
    if pair_batch < 1:
        raise InputError(f"pair batch must be positive, got {pair_batch}")
    image_rows, caption_rows = image_rows.to(device), caption_rows.to(device)
    out = torch.empty(image_rows.numel(), dtype=torch.float32, device=device)
    head.to(device)
    starts = range(0, image_rows.numel(), pair_batch)
    with inference(head, device):
        for p0 in progress_bar(starts, disable=not progress, desc="score pairs", leave=False):
            rows = slice(p0, p0 + pair_batch)
            images = index_encoded(img_enc, image_rows[rows].to(_device_of(img_enc)))
            texts = index_encoded(txt_enc, caption_rows[rows].to(_device_of(txt_enc)))
            out[rows] = head.score_pairs(_on(images, device), _on(texts, device))
    return out.cpu()


def _device_of(enc: Encoded) -> torch.device:
    return next(iter(enc.values())).device


def _on(enc: Encoded, device: torch.device) -> Encoded:
    """The encoding on ``device`` (no copy for tensors already there)."""
    return map_encoded(enc, lambda t: t.to(device, non_blocking=True))
