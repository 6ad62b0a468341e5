"""Retrieval metrics from a similarity matrix, and the standard evaluation protocols.

Ranks are 0-based positions of the ground truth in a query's ranking, computed without sorting:
the rank of a ground truth is the number of other items ranked before it.

Tie rule (pessimistic): an item whose score *equals* the ground truth's score is ranked before it.
For image-to-text queries, which have several ground-truth captions, the rank is that of the
best-scored ground truth, i.e. the number of non-ground-truth captions scoring at least as high as
the best ground truth (ground truths tied with each other do not push each other down). A constant
scorer therefore gets the worst possible rank instead of a perfect one, so a collapsed head cannot
look good. With float similarities, exact ties are rare and the rule almost never matters; the
reference repositories break ties by ``np.argsort`` order (arbitrary). A NaN similarity counts as
``-inf`` (ranked last).

R@K is the hit rate of torchmetrics' ``RetrievalHitRate``: the percentage of queries with *any*
ground truth in their top K (not ``RetrievalRecall``, which divides by the number of ground truths).
``medr = floor(median rank) + 1``, ``meanr = mean rank + 1`` (1-based), ``rsum`` = the sum of the six
R@K values. An image with no caption is no i2t query (it stays in the t2i gallery).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from cache.errors import InputError

RECALL_AT = (1, 5, 10)
METRIC_KEYS = tuple(f"{d}_{m}" for d in ("i2t", "t2i")
                    for m in [f"r{k}" for k in RECALL_AT] + ["medr", "meanr"]) + ("rsum",)
COCO_IMAGES = 5000
COCO_FOLD = 1000
_CHUNK_ELEMENTS = 1 << 24  # bound on the boolean temporaries of the rank counts


def clean_scores(sims: Tensor) -> Tensor:
    """Scores as float32 (float64 kept as it is, lower precisions widened) with NaN replaced by
    -inf (ranked last)."""
    if sims.dtype not in (torch.float32, torch.float64):
        sims = sims.float()
    nan = torch.isnan(sims)
    return sims.masked_fill(nan, float("-inf")) if nan.any() else sims


def check_caption_image(caption_image: Tensor, num_images: int, num_captions: int,
                        source: str = "") -> Tensor:
    """Validate the caption -> image map of a similarity matrix; returns it as int64 (same device)."""
    where = f"{source}: " if source else ""
    caption_image = torch.as_tensor(caption_image).long()
    if caption_image.dim() != 1 or caption_image.numel() != num_captions:
        raise InputError(f"{where}{caption_image.numel()} caption image indices for a similarity "
                         f"matrix with {num_captions} captions")
    if num_captions and (caption_image.min() < 0 or caption_image.max() >= num_images):
        bad = int(torch.nonzero((caption_image < 0) | (caption_image >= num_images))[0])
        raise InputError(f"{where}caption row {bad} points to image row "
                         f"{int(caption_image[bad])}, outside the {num_images} images")
    return caption_image


def best_gt_scores(sims: Tensor, caption_image: Tensor) -> tuple[Tensor, Tensor]:
    """Per image: the best score among its ground-truth captions (``-inf`` without captions) and
    how many ground truths reach it."""
    n_img = sims.shape[0]
    gt = sims[caption_image, torch.arange(sims.shape[1], device=sims.device)]
    best = torch.full((n_img,), float("-inf"), dtype=sims.dtype, device=sims.device)
    best = best.scatter_reduce(0, caption_image, gt, reduce="amax", include_self=True)
    at_best = torch.zeros(n_img, dtype=torch.long, device=sims.device)
    at_best.scatter_add_(0, caption_image, (gt >= best[caption_image]).long())
    return best, at_best


def count_at_least(sims: Tensor, threshold: Tensor) -> Tensor:
    """Per row, how many entries of ``sims [R, C]`` are ``>= threshold [R]`` (chunked over rows)."""
    step = max(1, _CHUNK_ELEMENTS // max(1, sims.shape[1]))
    out = torch.empty(sims.shape[0], dtype=torch.long, device=sims.device)
    for i in range(0, sims.shape[0], step):
        out[i:i + step] = (sims[i:i + step] >= threshold[i:i + step, None]).sum(1)
    return out


def i2t_ranks(sims: Tensor, caption_image: Tensor) -> Tensor:
    """Rank of the best ground-truth caption of each image ``[N_img]`` (pessimistic ties); images
    without captions get -1."""
    sims = clean_scores(sims)
    best, at_best = best_gt_scores(sims, caption_image)
    has_gt = torch.bincount(caption_image, minlength=sims.shape[0]) > 0
    ranks = count_at_least(sims, best) - at_best
    return torch.where(has_gt, ranks, torch.full_like(ranks, -1))


def t2i_ranks(sims: Tensor, caption_image: Tensor) -> Tensor:
    """Rank of the image of each caption ``[N_cap]`` (pessimistic ties)."""
    sims = clean_scores(sims).t()
    gt = sims[torch.arange(sims.shape[0], device=sims.device), caption_image]
    return count_at_least(sims, gt) - 1


def rank_metrics(ranks: Tensor, prefix: str) -> dict[str, float]:
    """R@1/5/10 (percent hit rate), medr and meanr of 0-based ranks; negative ranks are skipped."""
    ranks = ranks[ranks >= 0].long()
    if ranks.numel() == 0:
        raise InputError(f"no {prefix} queries to evaluate")
    out = {f"{prefix}_r{k}": 100.0 * float((ranks < k).double().mean()) for k in RECALL_AT}
    ordered = ranks.sort().values
    n = ordered.numel()
    out[f"{prefix}_medr"] = float((int(ordered[(n - 1) // 2]) + int(ordered[n // 2])) // 2 + 1)
    out[f"{prefix}_meanr"] = float(ranks.double().mean()) + 1.0
    return out


def metrics_from_ranks(i2t: Tensor, t2i: Tensor) -> dict[str, float]:
    """The full metric dict (``METRIC_KEYS``) of per-query ranks of both directions."""
    out = {**rank_metrics(i2t, "i2t"), **rank_metrics(t2i, "t2i")}
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in RECALL_AT)
    return out


def recall_metrics(sims: Tensor, caption_image: Tensor) -> dict[str, float]:
    """i2t and t2i R@1/5/10, medr, meanr and rsum of a similarity matrix ``[N_img, N_cap]``.

    ``caption_image[j]`` is the image row of caption j; any number of captions per image.
    """
    sims = torch.as_tensor(sims)
    caption_image = check_caption_image(caption_image, sims.shape[0], sims.shape[1]).to(sims.device)
    return metrics_from_ranks(i2t_ranks(sims, caption_image), t2i_ranks(sims, caption_image))


def mean_metrics(parts: Sequence[dict[str, float]]) -> dict[str, float]:
    """Average each metric over folds (rsum included, as the COCO 1K protocol reports it)."""
    return {k: sum(p[k] for p in parts) / len(parts) for k in parts[0]}


# -------------------------------------------------------------------------------------- protocols

Subset = tuple[Tensor, Tensor]
"""Image rows and caption rows of one evaluation gallery (a fold)."""


def fold_indices(caption_image: Tensor, fold: int, fold_size: int = COCO_FOLD) -> Subset:
    """Image rows ``fold*fold_size ...`` (``fold_size`` of them) and the rows of their captions."""
    caption_image = torch.as_tensor(caption_image).long().cpu()
    start = fold * fold_size
    images = torch.arange(start, start + fold_size)
    captions = torch.nonzero((caption_image >= start) & (caption_image < start + fold_size)).squeeze(1)
    return images, captions


def local_caption_image(caption_image: Tensor, subset: Subset, num_images: int) -> Tensor:
    """The caption -> image map of a gallery in its own row numbering (-1: image not in it)."""
    images, captions = subset
    lookup = torch.full((num_images,), -1, dtype=torch.long)
    lookup[images] = torch.arange(images.numel())
    return lookup[torch.as_tensor(caption_image).long().cpu()[captions]]


def fold(sims: Tensor, caption_image: Tensor, index: int,
         fold_size: int = COCO_FOLD) -> tuple[Tensor, Tensor]:
    """The similarity block of fold ``index`` and its caption -> image map (fold-local rows)."""
    subset = fold_indices(caption_image, index, fold_size)
    return _block(sims, subset), local_caption_image(caption_image, subset, sims.shape[0])


def _block(sims: Tensor, subset: Subset) -> Tensor:
    images, captions = subset
    return sims[images.to(sims.device)][:, captions.to(sims.device)]


def _whole(num_images: int, caption_image: Tensor) -> list[Subset]:
    return [(torch.arange(num_images), torch.arange(caption_image.numel()))]


def _coco_folds(num_images: int, caption_image: Tensor) -> list[Subset]:
    return [fold_indices(caption_image, f) for f in range(COCO_IMAGES // COCO_FOLD)]


PROTOCOLS: dict[str, tuple[Callable[[int, Tensor], list[Subset]], int | None]] = {
    "full": (_whole, None), "coco5k": (_whole, COCO_IMAGES), "coco1k": (_coco_folds, COCO_IMAGES)}
"""Protocol name -> (the galleries it evaluates, the image count it requires or None); metrics
are averaged over the galleries."""


def protocol_subsets(num_images: int, caption_image: Tensor, protocol: str,
                     source: str = "") -> list[Subset]:
    """The (image rows, caption rows) galleries of ``protocol`` on a split (CPU index tensors).
    ``source`` names the file in error messages."""
    if protocol not in PROTOCOLS:
        raise InputError(f"unknown evaluation protocol {protocol!r}; choose from {sorted(PROTOCOLS)}")
    subsets, required = PROTOCOLS[protocol]
    if required is not None and num_images != required:
        where = f"{source}: " if source else ""
        raise InputError(f"{where}protocol {protocol!r} needs the COCO 5K test split "
                         f"({required} images), got {num_images} images")
    return subsets(num_images, torch.as_tensor(caption_image).long().cpu())


def gallery_metrics(matrices: list[Tensor], subsets: list[Subset], caption_image: Tensor,
                    num_images: int) -> dict[str, float]:
    """Metrics of a protocol's galleries (``protocol_subsets``) from the similarity matrix of each
    (``[gallery images, gallery captions]``): "full" and "coco5k" have one gallery, "coco1k" five,
    and each metric, rsum too, is their mean."""
    return mean_metrics([recall_metrics(sims, local_caption_image(caption_image, subset,
                                                                  num_images))
                         for sims, subset in zip(matrices, subsets, strict=True)])


def captions_per_image(caption_image: Tensor, num_images: int) -> dict[str, float]:
    """How many captions each image has: ``min``, ``max`` and ``mean`` (for the eval report)."""
    counts = torch.bincount(torch.as_tensor(caption_image).long().cpu(), minlength=num_images)
    return {"min": int(counts.min()), "max": int(counts.max()),
            "mean": round(float(counts.float().mean()), 3)}


def describe_captions_per_image(counts: dict[str, float]) -> str:
    """``5 captions per photo`` or ``1-5 captions per photo (mean 2.93)``."""
    if counts["min"] == counts["max"]:
        return f"{counts['min']} captions per photo"
    return f"{counts['min']}-{counts['max']} captions per photo (mean {counts['mean']:.2f})"

