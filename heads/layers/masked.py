"""Masked token-set primitives: L2 normalisation, special-token masks and masked pooling.

Conventions: token sets are padded tensors ``[B, N, D]`` with a boolean ``mask [B, N]`` (True =
valid). Valid tokens need not form a prefix: every function here reads the mask, never a length, so
the amount of padding (and where it sits) never changes a result. Everything is vectorised and
device-agnostic (no host synchronisation).
"""
from __future__ import annotations

import torch
from torch import Tensor

# ----------------------------------------------------------------------------- normalisation, masks


def l2norm(x: Tensor, dim: int = -1, eps: float = 1e-8) -> Tensor:
    """``x / (||x||_2 + eps)`` along ``dim`` (the VSE/SCAN form: eps added to the norm)."""
    return x / (x.norm(p=2, dim=dim, keepdim=True) + eps)


def strip_special(mask: Tensor, prefix: int = 0, suffix: int = 0) -> Tensor:
    """The mask without the first ``prefix`` positions and the last ``suffix`` *valid* tokens of
    each row (e.g. a text cache's ``[CLS]`` and ``[SEP]``, an image cache's CLS/pooled tokens)."""
    out = mask.clone()
    if prefix:
        out[:, :prefix] = False
    if suffix:
        rank_from_end = mask.flip(1).long().cumsum(1).flip(1)   # 1 for the last valid token
        out &= rank_from_end > suffix
    return out


NEG_LARGE = torch.finfo(torch.float32).min
"""Value of masked entries before a float32 softmax or log-sum-exp (finite, so no NaN gradients)."""


def _expand(mask: Tensor, like: Tensor) -> Tensor:
    return mask.reshape(mask.shape + (1,) * (like.dim() - mask.dim()))


# ----------------------------------------------------------------------------- pooling


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of the valid vectors: ``x [B, N, D]``, ``mask [B, N]`` -> ``[B, D]`` (zeros where a row
    has no valid vector). One batched matrix product with the mask as weights, so padding entries
    must be finite (cache padding and every layer output here are)."""
    count = mask.sum(dim=1, keepdim=True).clamp(min=1).to(x.dtype)
    weights = mask.to(x.dtype).unsqueeze(1)                                          # [B, 1, N]
    return torch.bmm(weights, x.reshape(x.shape[0], x.shape[1], -1)).reshape(
        x.shape[0], *x.shape[2:]) / count


def masked_max(x: Tensor, mask: Tensor, dim: int) -> Tensor:
    """Maximum of ``x`` over ``dim`` among entries where ``mask`` (broadcastable) is True; rows with
    no valid entry give 0."""
    mask = mask.expand_as(x)
    out = x.masked_fill(~mask, float("-inf")).amax(dim=dim)
    return out.masked_fill(~mask.any(dim=dim), 0)


def masked_softmax(x: Tensor, mask: Tensor, dim: int) -> Tensor:
    """Softmax over ``dim`` among entries where ``mask`` (broadcastable) is True; masked entries get
    0, and a slice with no valid entry is all zeros (never NaN)."""
    mask = mask.expand_as(x)
    weights = torch.softmax(x.float().masked_fill(~mask, NEG_LARGE), dim=dim)
    return weights.masked_fill(~mask, 0)


def masked_logsumexp(x: Tensor, mask: Tensor, dim: int) -> Tensor:
    """log-sum-exp over ``dim`` among entries where ``mask`` (broadcastable) is True; a slice with
    no valid entry gives 0 (and a finite gradient)."""
    mask = mask.expand_as(x)
    out = torch.logsumexp(x.float().masked_fill(~mask, NEG_LARGE), dim=dim)
    return out.masked_fill(~mask.any(dim=dim), 0)


def masked_topk_mean(x: Tensor, mask: Tensor, k: int = 2) -> Tensor:
    """Per channel, the mean of the ``k`` largest valid values (HREM's max-k pooling):
    ``x [B, N, D]``, ``mask [B, N]`` -> ``[B, D]``. Rows with fewer than ``k`` valid vectors average
    the ones they have (never the padding)."""
    k_eff = min(k, x.shape[1])
    top = x.masked_fill(~_expand(mask, x), float("-inf")).topk(k_eff, dim=1).values   # [B, k, D]
    count = mask.sum(dim=1).clamp(max=k_eff)                                         # [B]
    keep = torch.arange(k_eff, device=x.device).unsqueeze(0) < count.unsqueeze(1)    # [B, k]
    total = top.masked_fill(~keep.unsqueeze(-1), 0).sum(dim=1)
    return total / count.clamp(min=1).unsqueeze(1).to(x.dtype)
