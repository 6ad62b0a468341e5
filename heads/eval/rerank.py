"""Two-stage retrieval: shortlist by a cheap coarse score, re-score the shortlist with a fine one.

For every image query the top ``k_i2t`` captions by the coarse matrix, and for every caption query
the top ``k_t2i`` images, are re-scored by the fine scorer (each distinct pair once, even when it is
in the shortlists of both directions) and re-ordered by ``fine + fuse_weight * coarse``. The final
ranking of a query is its shortlist in that order, followed by every other item in coarse order.

A query whose ground truth is not in its shortlist is a miss: its rank is its position in the
coarse order behind the shortlist, so at least ``k`` (TGDT's released code gives such queries rank
0, a hit at R@1). With ``k`` equal to the gallery size the result is exactly full fine scoring.
Ties follow ``heads.eval.metrics`` (pessimistic: equal scores rank before the ground truth), in both
stages.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from cache.errors import InputError
from heads.eval.metrics import best_gt_scores, clean_scores, i2t_ranks, metrics_from_ranks, t2i_ranks

FineScorer = Callable[[Tensor, Tensor], Tensor]
"""``scorer(image_rows [P], caption_rows [P]) -> fine scores [P]`` of aligned pairs (CPU float)."""


@dataclass(frozen=True)
class Shortlist:
    """The top-k candidates of each query of one direction, best coarse score first."""

    rows: Tensor     # [Q, k] candidate rows (captions of an image query, images of a caption query)
    coarse: Tensor   # [Q, k] their coarse scores

    @property
    def k(self) -> int:
        return self.rows.shape[1]


def parse_topk(text: str | int) -> tuple[int, int]:
    """Shortlist lengths from ``"K"`` (both directions) or ``"K_I2T,K_T2I"``."""
    parts = str(text).split(",")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or min(values) < 1:
        raise InputError(f"top-k must be K or K_I2T,K_T2I with positive integers, got {text!r}")
    return values[0], values[-1]


def shortlist(scores: Tensor, k: int) -> Shortlist:
    """Top ``k`` columns of every row of ``scores [Q, N]`` (queries are rows)."""
    coarse, rows = scores.topk(k, dim=1)
    return Shortlist(rows, coarse)


def candidate_pairs(i2t: Shortlist, t2i: Shortlist,
                    num_captions: int) -> tuple[Tensor, Tensor, Tensor]:
    """The distinct (image, caption) pairs of both shortlists, and where each shortlist entry
    finds its pair: returns image rows ``[U]``, caption rows ``[U]`` and the pair index of every
    entry of ``i2t.rows`` then ``t2i.rows`` (flattened, ``[N_img*k_i2t + N_cap*k_t2i]``)."""
    n_img, n_cap = i2t.rows.shape[0], t2i.rows.shape[0]
    keys_i2t = torch.arange(n_img).unsqueeze(1) * num_captions + i2t.rows
    keys_t2i = t2i.rows * num_captions + torch.arange(n_cap).unsqueeze(1)
    keys, where = torch.unique(torch.cat([keys_i2t.flatten(), keys_t2i.flatten()]),
                               return_inverse=True)
    return keys // num_captions, keys % num_captions, where


def shortlist_ranks(fused: Tensor, is_gt: Tensor, coarse_rank: Tensor, coarse: Tensor,
                    coarse_gt: Tensor) -> Tensor:
    """Final 0-based ranks of one direction's queries.

    ``fused [Q, k]``: re-ranking scores of the shortlist; ``is_gt [Q, k]``: which candidates are
    ground truths; ``coarse_rank [Q]``: the query's rank in the coarse order (-1 = no ground
    truth); ``coarse [Q, k]``: the candidates' coarse scores; ``coarse_gt [Q]``: the best coarse
    score of the query's ground truths. A ground truth in the shortlist ranks by the fused score
    among the candidates; otherwise the query ranks ``k`` + the number of items outside the
    shortlist that the coarse order puts before its ground truth.
    """
    fused = clean_scores(fused)
    best = fused.masked_fill(~is_gt, float("-inf")).amax(dim=1)
    inside = ((fused >= best.unsqueeze(1)) & ~is_gt).sum(dim=1)
    outside = coarse.shape[1] + coarse_rank - (coarse >= coarse_gt.unsqueeze(1)).sum(dim=1)
    ranks = torch.where(is_gt.any(dim=1), inside, outside)
    return torch.where(coarse_rank >= 0, ranks, coarse_rank)


def rerank(coarse: Tensor, caption_image: Tensor, fine: FineScorer, k_i2t: int, k_t2i: int,
           fuse_weight: float = 0.0) -> dict[str, Any]:
    """Two-stage metrics of one gallery.

    ``coarse [N_img, N_cap]``: the coarse similarity matrix; ``caption_image [N_cap]``: image row
    of each caption; ``fine``: scores of aligned (image, caption) row pairs; ``k_i2t`` / ``k_t2i``:
    shortlist lengths (clipped to the gallery). Returns the coarse-only and the final metrics, the
    coarse recall at k per direction (percent of queries with a ground truth in the shortlist),
    the shortlist lengths used, the pairs scored by the fine stage and seconds per stage.
    """
    n_img, n_cap = coarse.shape
    if k_i2t < 1 or k_t2i < 1:
        raise InputError(f"shortlist lengths must be positive, got i2t {k_i2t}, t2i {k_t2i}")
    k_i2t, k_t2i = min(k_i2t, n_cap), min(k_t2i, n_img)
    coarse = clean_scores(coarse.cpu())
    caption_image = caption_image.long().cpu()
    seconds: dict[str, float] = {}

    start = time.perf_counter()
    by_image, by_caption = shortlist(coarse, k_i2t), shortlist(coarse.t(), k_t2i)
    image_rows, caption_rows, where = candidate_pairs(by_image, by_caption, n_cap)
    seconds["shortlist"] = time.perf_counter() - start

    start = time.perf_counter()
    pair_scores = clean_scores(fine(image_rows, caption_rows).cpu())
    seconds["fine"] = time.perf_counter() - start

    start = time.perf_counter()
    per_entry = pair_scores[where]
    fine_i2t = per_entry[:n_img * k_i2t].view(n_img, k_i2t)
    fine_t2i = per_entry[n_img * k_i2t:].view(n_cap, k_t2i)
    gt_i2t = caption_image[by_image.rows] == torch.arange(n_img).unsqueeze(1)
    gt_t2i = by_caption.rows == caption_image.unsqueeze(1)
    coarse_i2t, coarse_t2i = i2t_ranks(coarse, caption_image), t2i_ranks(coarse, caption_image)
    final_i2t = shortlist_ranks(fine_i2t + fuse_weight * by_image.coarse, gt_i2t, coarse_i2t,
                                by_image.coarse, best_gt_scores(coarse, caption_image)[0])
    final_t2i = shortlist_ranks(fine_t2i + fuse_weight * by_caption.coarse, gt_t2i, coarse_t2i,
                                by_caption.coarse, coarse[caption_image, torch.arange(n_cap)])
    has_caption = coarse_i2t >= 0
    result = {
        "coarse": metrics_from_ranks(coarse_i2t, coarse_t2i),
        "final": metrics_from_ranks(final_i2t, final_t2i),
        "coarse_recall_at_k": {
            "i2t": 100.0 * float(gt_i2t[has_caption].any(dim=1).double().mean()),
            "t2i": 100.0 * float(gt_t2i.any(dim=1).double().mean())},
        "topk": {"i2t": k_i2t, "t2i": k_t2i},
        "pairs_scored": int(image_rows.numel()),
        "pairs_full": n_img * n_cap,
    }
    seconds["rank"] = time.perf_counter() - start
    result["seconds"] = seconds
    return result
