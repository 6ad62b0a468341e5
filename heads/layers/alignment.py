"""Word-token alignment scores: LAPS's max-mean and TERAN's MrSw, per pair and per block."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from heads.layers.masked import masked_max, masked_mean

# ----------------------------------------------------------------------------- token alignments


def max_mean_alignment(img: Tensor, img_mask: Tensor, txt: Tensor, txt_mask: Tensor,
                       negative_slope: float = 0.1) -> Tensor:
    """LAPS's bidirectional max-mean score of aligned pairs -> ``[P]``.

    With A_lv = leaky_relu(cos(word l, token v)) (inputs already L2-normalised):
    mean over valid words of the max over valid tokens, plus mean over valid tokens of the max over
    valid words. ``img [P, V, C]``, ``img_mask [P, V]``, ``txt [P, L, C]``, ``txt_mask [P, L]``."""
    sims = F.leaky_relu(torch.einsum("plc,pvc->plv", txt, img), negative_slope)      # [P, L, V]
    pair_mask = txt_mask.unsqueeze(2) & img_mask.unsqueeze(1)
    word_best = masked_max(sims, pair_mask, dim=2)                                   # [P, L]
    token_best = masked_max(sims, pair_mask, dim=1)                                  # [P, V]
    return masked_mean(word_best.unsqueeze(-1), txt_mask).squeeze(-1) + \
        masked_mean(token_best.unsqueeze(-1), img_mask).squeeze(-1)


WORD_POOLS = ("sum", "mean")


def _pool_words(best: Tensor, txt_mask: Tensor, word_pool: str, dim: int) -> Tensor:
    """Sum (MrSw) or mean (MrAVGw) of the per-word maxima ``best`` over the valid words."""
    total = best.masked_fill(~txt_mask, 0).sum(dim=dim)
    if word_pool == "sum":
        return total
    if word_pool != "mean":
        raise ValueError(f"word_pool must be one of {WORD_POOLS}, got {word_pool!r}")
    return total / txt_mask.sum(dim=dim).clamp(min=1)


def mrsw(img: Tensor, img_mask: Tensor, txt: Tensor, txt_mask: Tensor,
         word_pool: str = "sum") -> Tensor:
    """TERAN's MrSw of aligned pairs -> ``[P]``: for each valid word the max cosine over valid
    regions, summed over words (``word_pool="mean"``: averaged, TERAN's MrAVGw, a score in
    [-1, 1] like a cosine). Padding regions are excluded from the max (-inf, not 0, so no hidden
    ReLU); a pair whose image has no valid region scores 0. Inputs already L2-normalised."""
    sims = torch.einsum("pwc,prc->pwr", txt, img)                                    # [P, W, R]
    best = masked_max(sims, img_mask.unsqueeze(1), dim=2)                            # [P, W]
    return _pool_words(best, txt_mask, word_pool, dim=1)


def mrsw_block(img: Tensor, img_mask: Tensor, txt: Tensor, txt_mask: Tensor,
               word_pool: str = "sum") -> Tensor:
    """MrSw of every image of a block against every caption -> ``[I, T]``, one matrix product:
    ``img [I, R, C]``, ``img_mask [I, R]``, ``txt [T, W, C]``, ``txt_mask [T, W]``.
    Memory ``I*R*T*W`` similarities; callers bound it by the block size."""
    n_img, n_reg, dim = img.shape
    n_txt, n_word, _ = txt.shape
    sims = (txt.reshape(-1, dim) @ img.reshape(-1, dim).transpose(0, 1))
    sims = sims.view(n_txt, n_word, n_img, n_reg)
    best = masked_max(sims, img_mask.view(1, 1, n_img, n_reg), dim=3)                # [T, W, I]
    return _pool_words(best, txt_mask.unsqueeze(-1), word_pool, dim=1).transpose(0, 1)
