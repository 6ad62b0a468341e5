"""Evaluate a head on an (image cache, text cache) split: full scoring or two-stage re-ranking.

Every image and caption is encoded once (``heads.eval.scoring``); the similarity matrix of each gallery
of the protocol is filled block by block; metrics follow ``heads.eval.metrics`` (R@K as a hit rate,
pessimistic ties). For COCO 1K only the five diagonal 1,000 x 5,000 blocks are scored (a fifth of
the 5K matrix). ``two_stage`` shortlists with a coarse branch and re-ranks with a fine one
(``heads.eval.rerank``). Heads are left in the mode and train/eval state they came in.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor

from cache.datasets import check_pairing
from cache.errors import InputError
from cache.store import ImageCache, TextCache
from heads.base import Encoded, index_encoded, num_items
from heads.eval.metrics import (Subset, captions_per_image, fold_indices, gallery_metrics,
                                local_caption_image, mean_metrics, protocol_subsets)
from heads.eval.rerank import FineScorer, rerank
from heads.eval.scoring import (DEFAULT_CAPTION_BLOCK, DEFAULT_IMAGE_BLOCK, DEFAULT_PAIR_BATCH,
                                encode_cache, score_pairs, similarity_matrix, synchronize)
from heads.model import Retriever


@contextlib.contextmanager
def _mode(head: Retriever, mode: str | None) -> Iterator[Retriever]:
    """Run with ``mode`` set (when given), restoring the head's previous mode afterwards."""
    previous = head.mode
    if mode is not None:
        head.set_mode(mode)
    try:
        yield head
    finally:
        head.mode = previous


def _gallery(enc: Encoded, rows: Tensor) -> Encoded:
    """The encodings at positions ``rows`` of ``enc`` (no copy when they are all of them)."""
    if rows.numel() == num_items(enc):
        return enc
    return index_encoded(enc, rows.to(next(iter(enc.values())).device))


def _timed(seconds: dict[str, float], stage: str, device: torch.device, start: float) -> float:
    synchronize(device)
    now = time.perf_counter()
    seconds[stage] = seconds.get(stage, 0.0) + now - start
    return now


def evaluate(head: Retriever, image_cache: ImageCache, text_cache: TextCache,
             protocol: str = "full", device: torch.device | str = "cpu",
             image_block: int = DEFAULT_IMAGE_BLOCK, caption_block: int = DEFAULT_CAPTION_BLOCK,
             batch_size: int = 256,
             save_sims: str | Path | None = None, progress: bool = False,
             max_images: int | None = None) -> dict[str, Any]:
    """Score every pair of each gallery of ``protocol`` with the head's active branch.

    Returns ``metrics`` (``heads.eval.metrics.METRIC_KEYS``, averaged over the galleries), ``seconds``
    per stage (encode, score, metrics), ``pairs_scored``, the split size, the branch used and the
    device. ``max_images`` (protocol "full" only) evaluates one gallery of the split's first
    ``max_images`` images and their captions instead of the whole split; only the rows of the
    galleries are encoded. ``save_sims`` writes a ``.npz`` with ``sims_<g>``, ``image_rows_<g>``,
    ``caption_rows_<g>`` per gallery g and the split's ``caption_image``.
    """
    device = torch.device(device)
    caption_image = check_pairing(image_cache, text_cache)
    if max_images is not None and protocol != "full":
        raise InputError(f"max_images needs protocol 'full', got {protocol!r}")
    subsets = protocol_subsets(len(image_cache), caption_image, protocol, source=str(text_cache.path))
    if max_images is not None and max_images < len(image_cache):
        subsets = [fold_indices(caption_image, 0, max_images)]
    image_rows = torch.unique(torch.cat([images for images, _ in subsets]))     # sorted
    caption_rows = torch.unique(torch.cat([captions for _, captions in subsets]))
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    img_enc = encode_cache(head, image_cache, device, batch_size, progress, image_rows.numpy())
    txt_enc = encode_cache(head, text_cache, device, batch_size, progress, caption_rows.numpy())
    start = _timed(seconds, "encode", device, start)
    matrices = [similarity_matrix(head, _gallery(img_enc, torch.searchsorted(image_rows, images)),
                                  _gallery(txt_enc, torch.searchsorted(caption_rows, captions)),
                                  device, image_block, caption_block, progress)
                for images, captions in subsets]
    start = _timed(seconds, "score", device, start)
    metrics = gallery_metrics(matrices, subsets, caption_image, len(image_cache))
    _timed(seconds, "metrics", device, start)
    if save_sims is not None:
        _save(save_sims, matrices, subsets, caption_image)
    return {"protocol": protocol, "metrics": metrics, "seconds": seconds,
            "pairs_scored": sum(s.numel() for s in matrices), "images": len(image_cache),
            "captions": len(text_cache),
            "captions_per_image": captions_per_image(caption_image, len(image_cache)),
            "score_kind": head.score_kind, "mode": head.mode,
            "device": str(device)}


def _save(path: str | Path, matrices: list[Tensor], subsets: list[Subset],
          caption_image: Tensor) -> None:
    arrays: dict[str, np.ndarray] = {"caption_image": caption_image.numpy()}
    for g, (sims, (images, captions)) in enumerate(zip(matrices, subsets)):
        arrays.update({f"sims_{g}": sims.numpy(), f"image_rows_{g}": images.numpy(),
                       f"caption_rows_{g}": captions.numpy()})
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)


def _pair_scorer(head: Retriever, mode: str | None, img_enc: Encoded, txt_enc: Encoded,
                 gallery: Subset, device: torch.device, pair_batch: int,
                 progress: bool) -> FineScorer:
    """Fine scores of (gallery image row, gallery caption row) pairs with ``head`` in ``mode``."""
    images, captions = gallery

    def fine(image_rows: Tensor, caption_rows: Tensor) -> Tensor:
        with _mode(head, mode):
            return score_pairs(head, img_enc, txt_enc, images[image_rows], captions[caption_rows],
                               device, pair_batch, progress)
    return fine


def two_stage(coarse_head: Retriever, fine_head: Retriever, image_cache: ImageCache,
              text_cache: TextCache, topk: int | tuple[int, int],
              device: torch.device | str = "cpu", protocol: str = "full",
              coarse_mode: str | None = None, fine_mode: str | None = None,
              fuse_weight: float = 0.0, pair_batch: int = DEFAULT_PAIR_BATCH,
              image_block: int = DEFAULT_IMAGE_BLOCK, caption_block: int = DEFAULT_CAPTION_BLOCK,
              batch_size: int = 256, progress: bool = False) -> dict[str, Any]:
    """Two-stage retrieval: coarse shortlist, fine re-rank (see ``heads.eval.rerank``).

    ``coarse_head`` / ``fine_head`` may be one head object used in two modes (``coarse_mode``,
    ``fine_mode``; e.g. a global embedding branch and a local interaction branch); it is then
    encoded once. ``topk`` is the shortlist length, or ``(k_i2t, k_t2i)``. The re-ranking score is
    ``fine + fuse_weight * coarse``. Returns per protocol (averaged over galleries as
    ``evaluate``): ``coarse`` and ``final`` metrics, ``coarse_recall_at_k`` per direction,
    ``topk``, ``pairs_scored`` (distinct pairs the fine branch scored) against ``pairs_full``,
    and ``seconds`` per stage (encode, coarse, shortlist, fine, rank).
    """
    device = torch.device(device)
    k_i2t, k_t2i = (topk, topk) if isinstance(topk, int) else topk
    for head, mode in ((coarse_head, coarse_mode), (fine_head, fine_mode)):
        with _mode(head, mode):  # an unknown mode fails here, before any encoding
            pass
    caption_image = check_pairing(image_cache, text_cache)
    subsets = protocol_subsets(len(image_cache), caption_image, protocol, source=str(text_cache.path))
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    coarse_img = encode_cache(coarse_head, image_cache, device, batch_size, progress)
    coarse_txt = encode_cache(coarse_head, text_cache, device, batch_size, progress)
    if fine_head is coarse_head:
        fine_img, fine_txt = coarse_img, coarse_txt
    else:
        fine_img = encode_cache(fine_head, image_cache, device, batch_size, progress)
        fine_txt = encode_cache(fine_head, text_cache, device, batch_size, progress)
    start = _timed(seconds, "encode", device, start)

    galleries = []
    for images, captions in subsets:
        with _mode(coarse_head, coarse_mode):
            coarse = similarity_matrix(coarse_head, _gallery(coarse_img, images),
                                       _gallery(coarse_txt, captions), device, image_block,
                                       caption_block, progress)
        start = _timed(seconds, "coarse", device, start)
        fine = _pair_scorer(fine_head, fine_mode, fine_img, fine_txt, (images, captions), device,
                            pair_batch, progress)
        local = local_caption_image(caption_image, (images, captions), len(image_cache))
        result = rerank(coarse, local, fine, k_i2t, k_t2i, fuse_weight)
        for stage, value in result.pop("seconds").items():
            seconds[stage] = seconds.get(stage, 0.0) + value
        galleries.append(result)
        start = time.perf_counter()
    return {
        "protocol": protocol, "fuse_weight": fuse_weight,
        "coarse": mean_metrics([g["coarse"] for g in galleries]),
        "final": mean_metrics([g["final"] for g in galleries]),
        "coarse_recall_at_k": mean_metrics([g["coarse_recall_at_k"] for g in galleries]),
        "topk": galleries[0]["topk"],
        "pairs_scored": sum(g["pairs_scored"] for g in galleries),
        "pairs_full": sum(g["pairs_full"] for g in galleries),
        "seconds": seconds, "images": len(image_cache), "captions": len(text_cache),
        "captions_per_image": captions_per_image(caption_image, len(image_cache)),
        "device": str(device)}


__all__ = ["evaluate", "two_stage"]
