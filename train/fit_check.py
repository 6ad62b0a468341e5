"""Can a head learn at all? Fit a few hundred training pairs and measure recall on those pairs.

A head that cannot reach near-perfect recall on the pairs it was trained on (a few hundred, many
steps, no augmentation) has a bug (a wrong mask, a detached branch, a loss term that fights the
others), not a recipe problem. ``fit_pairs`` trains a freshly built head on the first
``num_images`` images of a split and all of their captions, with the configured loss and
learning rate, and measures R@1 on the same pairs for every branch the head trains
(``Head.trained_branches``: ALADIN's teacher stage fits the teacher only), until
each branch reaches ``target`` or ``max_steps`` is spent.

The data path is the cache's own (``ImageCache.read`` / ``TextCache.read``), the head and loss are
built by the registries from a resolved run config (``train.config.load_config``), and the batch
update is the head's own ``training_loss``: only sampling, augmentation (none) and the schedule
(constant lr) differ from ``cli train-head``.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from cache.batch import TokenBatch
from cache.datasets import check_pairing, to_token_batch
from cache.errors import InputError
from cache.store import ImageCache, TextCache
from heads.base import Encoded, FeatureSpec, Head, Progress, cat_encoded, index_encoded
from heads.checkpoint import load_pretrained_parts
from heads.eval.metrics import recall_metrics
from heads.losses import build_loss
from heads.registry import build_head

FIT_TARGET = 0.95          # R@1 both directions on the fitted pairs
SCORE_BLOCK = 16           # images per block when scoring the fitted pairs (interaction heads)


@dataclass
class FitResult:
    """How one head did on its fitted pairs: per branch, the best R@1 of each direction."""

    head: str
    images: int
    pairs: int
    steps: int
    seconds: float
    final_loss: float
    branches: dict[str, dict[str, float]] = field(default_factory=dict)
    reached: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fit_subset(images: ImageCache, texts: TextCache, num_images: int
               ) -> tuple[TokenBatch, TokenBatch, Tensor]:
    """The first ``num_images`` images of a split, all of their captions and each caption's image
    row (0 .. num_images-1), read from the caches as float32 batches."""
    caption_image = check_pairing(images, texts).numpy()
    if num_images < 2:
        raise InputError(f"fit check: need at least 2 images, got {num_images}")
    if num_images > len(images):
        raise InputError(f"{images.path}: fit check of {num_images} images, but the cache holds "
                         f"{len(images)}")
    caption_rows = np.nonzero(caption_image < num_images)[0]
    img_tokens, img_lengths = images.read(np.arange(num_images))
    txt_tokens, txt_lengths = texts.read(caption_rows)
    image_batch = to_token_batch(img_tokens.astype(np.float32), img_lengths)
    text_batch = to_token_batch(txt_tokens.astype(np.float32), txt_lengths)
    return image_batch, text_batch, torch.from_numpy(caption_image[caption_rows].astype(np.int64))


def _encode(batch: TokenBatch, encode: Callable[[TokenBatch], Encoded], block: int) -> Encoded:
    """``encode`` over ``batch`` in blocks of ``block`` rows, concatenated."""
    parts = [encode(batch.index(torch.arange(start, min(start + block, len(batch)))))
             for start in range(0, len(batch), block)]
    return cat_encoded(parts)


def pair_recall(head: Head, images: TokenBatch, texts: TokenBatch, caption_image: Tensor,
                mode: str | None) -> dict[str, float]:
    """R@1/5/10 of ``head`` (branch ``mode``) over the given images and captions (eval mode)."""
    previous, was_training = head.mode, head.training
    head.eval()
    head.set_mode(mode)
    try:
        with torch.no_grad():
            img = _encode(images, head.encode_images, 64)
            txt = _encode(texts, head.encode_texts, 256)
            n = images.tokens.shape[0]
            rows = [head.score(index_encoded(img, slice(s, min(s + SCORE_BLOCK, n))), txt)
                    for s in range(0, n, SCORE_BLOCK)]
            sims = torch.cat(rows).float()
        return recall_metrics(sims, caption_image)
    finally:
        head.mode = previous
        head.train(was_training)


def fit_pairs(config: dict[str, Any], images: ImageCache, texts: TextCache,
              num_images: int = 100, max_steps: int = 2000, check_every: int = 100,
              target: float = FIT_TARGET, seed: int = 0,
              log: Callable[[str], None] | None = None) -> FitResult:
    """Train the head of ``config`` on the first ``num_images`` images of (``images``, ``texts``)
    and their captions until every trained branch reaches R@1 >= ``target`` in both directions on those
    pairs, or ``max_steps`` optimisation steps (batch ``optim.batch_size``, Adam at
    ``optim.lr``, constant; no weight decay, no token drop)."""
    torch.manual_seed(seed)
    img_batch, txt_batch, caption_image = fit_subset(images, texts, num_images)
    specs = [FeatureSpec.from_cache(images), FeatureSpec.from_cache(texts)]
    head_cfg = {k: v for k, v in config["head"].items() if k != "name"}
    head = build_head(config["head"]["name"], *specs, **head_cfg)
    if head.pretrained_parts():
        load_pretrained_parts(head)
    criterion = build_loss(config["loss"]["name"],
                           **{k: v for k, v in config["loss"].items() if k != "name"})
    params = [p for p in list(head.parameters()) + list(criterion.parameters())
              if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=config["optim"]["lr"])
    grad_clip = config["optim"].get("grad_clip", 0.0)
    pairs = len(caption_image)
    batch_size = min(config["optim"]["batch_size"], pairs)
    steps_per_epoch = math.ceil(pairs / batch_size)
    generator = torch.Generator().manual_seed(seed)
    result = FitResult(head.name, num_images, pairs, 0, 0.0, math.nan)
    start = time.perf_counter()
    head.train()
    for step in range(1, max_steps + 1):
        order = torch.randperm(pairs, generator=generator)[:batch_size]
        progress = Progress(epoch=(step - 1) // steps_per_epoch, step=step - 1,
                            steps_per_epoch=steps_per_epoch)
        loss, _ = head.training_loss(img_batch.index(caption_image[order]),
                                     txt_batch.index(order), caption_image[order], criterion,
                                     progress)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        result.final_loss = float(loss.detach())
        if not math.isfinite(result.final_loss):
            raise InputError(f"fit check of head {head.name!r}: the loss became "
                             f"{result.final_loss} at step {step}; lower optim.lr")
        if step % check_every and step != max_steps:
            continue
        record: dict[str, Any] = {"step": step, "loss": result.final_loss}
        for mode in head.trained_branches():
            metrics = pair_recall(head, img_batch, txt_batch, caption_image, mode)
            name = mode or "default"
            record[name] = {"i2t_r1": metrics["i2t_r1"], "t2i_r1": metrics["t2i_r1"]}
            best = result.branches.setdefault(name, {"i2t_r1": 0.0, "t2i_r1": 0.0})
            for key in best:
                best[key] = max(best[key], metrics[key])
        result.history.append(record)
        result.steps = step
        if log is not None:
            log(_progress_line(head.name, record))
        if all(min(b.values()) >= 100 * target for b in result.branches.values()):
            result.reached = True
            break
    result.seconds = time.perf_counter() - start
    return result


def _progress_line(name: str, record: dict[str, Any]) -> str:
    shown = "  ".join(f"{k} {v['i2t_r1']:.1f}/{v['t2i_r1']:.1f}" for k, v in record.items()
                      if isinstance(v, dict))
    return f"{name} step {record['step']}: loss {record['loss']:.4f}  R@1 i2t/t2i {shown}"


def format_fit_table(results: list[tuple[str, FitResult]], target: float = FIT_TARGET) -> str:
    """One line per (config, branch): pairs, steps, best R@1 both ways, and whether it fitted."""
    lines = [f"{'config':<36} {'head':<8} {'branch':<9} {'pairs':>5} {'steps':>5} "
             f"{'i2t R@1':>8} {'t2i R@1':>8} {'loss':>8}  fitted (R@1 >= {100 * target:.0f})"]
    for label, r in results:
        for branch, best in r.branches.items():
            fitted = "yes" if min(best.values()) >= 100 * target else "NO"
            lines.append(f"{label:<36} {r.head:<8} {branch:<9} {r.pairs:>5} {r.steps:>5} "
                         f"{best['i2t_r1']:>8.1f} {best['t2i_r1']:>8.1f} "
                         f"{r.final_loss:>8.4f}  {fitted}")
    return "\n".join(lines)


__all__ = ["FIT_TARGET", "FitResult", "fit_subset", "pair_recall", "fit_pairs",
           "format_fit_table"]
