"""Shared building blocks of the heads: masked pooling, GPO, projections and token alignments.

Conventions: token sets are padded tensors ``[B, N, D]`` with a boolean ``mask [B, N]`` (True =
valid). Valid tokens need not form a prefix: every function here reads the mask, never a length, so
the amount of padding (and where it sits) never changes a result. Everything is vectorised and
device-agnostic (no host synchronisation).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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


def sinusoid_codes(length: int, dim: int, device: torch.device | None = None) -> Tensor:
    """Standard sin/cos positional codes ``[length, dim]`` for positions 0..length-1 (dim even)."""
    if dim % 2:
        raise ValueError(f"sinusoid codes need an even dimension, got {dim}")
    position = torch.arange(length, device=device, dtype=torch.float32).unsqueeze(1)
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32)
                     * (-math.log(10000.0) / dim))
    codes = torch.empty(length, dim, device=device)
    codes[:, 0::2] = torch.sin(position * freq)
    codes[:, 1::2] = torch.cos(position * freq)
    return codes


class GPO(nn.Module):
    """Generalised Pooling Operator of VSE∞ (Chen et al., CVPR 2021).

    For a set of N valid vectors: sinusoidal codes p_0..p_{N-1} (``d_pe``) run through a 1-layer
    bidirectional GRU (hidden ``d_hidden``); h_k is the mean of both directions; z_k = w^T h_k
    (no bias); theta = softmax(z / 0.1) over the N positions (padding at -10000); each channel
    of the vectors is sorted in descending order over the valid vectors and the output is
    ``sum_k theta_k * sorted_k``. The weights depend on N only.

    Variable lengths without packing (no host sync): the forward direction is causal, so one run on
    the codes serves every length; the backward direction runs forward-in-time over the codes
    reversed within each possible set size (valid codes first, so padding comes after them and
    cannot reach them), then is flipped back. The weights are computed once per set size (a table
    of ``width + 1`` rows) and indexed by each row's length, never once per batch row. The two
    directions are two unidirectional GRUs, equivalent to one ``nn.GRU(bidirectional=True)``.
    """

    def __init__(self, d_pe: int = 32, d_hidden: int = 32, temperature: float = 0.1) -> None:
        super().__init__()
        self.d_pe, self.temperature = d_pe, temperature
        self.gru_forward = nn.GRU(d_pe, d_hidden, batch_first=True)
        self.gru_backward = nn.GRU(d_pe, d_hidden, batch_first=True)
        self.score = nn.Linear(d_hidden, 1, bias=False)

    def weight_table(self, width: int, device: torch.device) -> Tensor:
        """Pooling weights of every set size: row n of ``[width + 1, width]`` holds the weights over
        sorted positions for a set of n valid vectors (0 beyond n). The weights depend on n only,
        so the GRUs run over ``width + 1`` rows whatever the batch size."""
        codes = sinusoid_codes(width, self.d_pe, device)                             # [T, d]
        steps = torch.arange(width, device=device)
        sizes = torch.arange(width + 1, device=device)
        forward_h = self.gru_forward(codes.unsqueeze(0))[0]                          # [1, T, h]
        reverse = (sizes.unsqueeze(1) - 1 - steps).clamp(min=0)                      # [T+1, T]
        backward_run = self.gru_backward(codes[reverse])[0]                          # [T+1, T, h]
        backward_h = backward_run.gather(1, reverse.unsqueeze(-1).expand_as(backward_run))
        z = self.score((forward_h + backward_h) / 2).squeeze(-1).float()            # [T+1, T]
        z = z.masked_fill(steps.unsqueeze(0) >= sizes.unsqueeze(1), -10000.0)
        return torch.softmax(z / self.temperature, dim=1)

    def pool_weights(self, lengths: Tensor, width: int) -> Tensor:
        """Weights ``[B, width]`` over sorted positions for sets of ``lengths [B]`` (0 beyond)."""
        return self.weight_table(width, lengths.device)[lengths]

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """Pool ``x [B, N, D]`` over its valid vectors (``mask [B, N]``) -> ``[B, D]``."""
        lengths = mask.sum(dim=1)
        weights = self.pool_weights(lengths, x.shape[1])                             # [B, N]
        ranked = x.masked_fill(~mask.unsqueeze(-1), float("-inf"))
        ranked = ranked.sort(dim=1, descending=True).values
        filled = torch.arange(x.shape[1], device=x.device).unsqueeze(0) < lengths.unsqueeze(1)
        ranked = ranked.masked_fill(~filled.unsqueeze(-1), 0)
        return (ranked * weights.unsqueeze(-1).to(ranked.dtype)).sum(dim=1)


# ----------------------------------------------------------------------------- projections


def xavier_linear(in_dim: int, out_dim: int, bias: bool = True) -> nn.Linear:
    """A Linear layer with Xavier-uniform weights and zero bias (the VSE/SCAN initialisation)."""
    layer = nn.Linear(in_dim, out_dim, bias=bias)
    nn.init.xavier_uniform_(layer.weight)
    if bias:
        nn.init.zeros_(layer.bias)
    return layer


class MaskedBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d over rows ``[M, C]`` whose batch statistics use only the rows where ``valid``
    is True (so zero padding never shifts them). Eval mode and ``valid=None`` behave exactly as
    ``nn.BatchNorm1d``. Running variance is updated with the unbiased estimate, as PyTorch does."""

    def forward(self, x: Tensor, valid: Tensor | None = None) -> Tensor:  # type: ignore[override]
        if valid is None or not self.training or not self.track_running_stats:
            return super().forward(x)
        xf = x.float()
        w = valid.to(xf.dtype).unsqueeze(1)                                          # [M, 1]
        n = w.sum()
        mean = (xf * w).sum(dim=0) / n.clamp(min=1)
        var = ((xf - mean).pow(2) * w).sum(dim=0) / n.clamp(min=1)
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            factor = (1.0 / self.num_batches_tracked.float() if self.momentum is None
                      else self.momentum)
            self.running_mean.lerp_(mean.detach(), factor)
            self.running_var.lerp_((var * n / (n - 1).clamp(min=1)).detach(), factor)
        out = (xf - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            out = out * self.weight + self.bias
        return out.to(x.dtype)


class ResidualMLPProjection(nn.Module):
    """VSE∞'s region projection: ``Linear(x) + MLP(x)`` with MLP = Linear(in->hidden) ->
    BatchNorm1d -> ReLU -> Linear(hidden->out); hidden defaults to ``out_dim // 2`` (2048->512->1024
    in the paper). The residual Linear is Xavier-initialised (bias 0) as in VSE∞; the MLP keeps
    PyTorch's default init as in the reference.

    Deviation (documented fix): the reference normalises over all B*N rows, zero padding included;
    here the batch statistics use the valid tokens only (``mask``)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int | None = None) -> None:
        super().__init__()
        hidden_dim = hidden_dim or max(1, out_dim // 2)
        self.fc = xavier_linear(in_dim, out_dim)
        self.mlp_in = nn.Linear(in_dim, hidden_dim)
        self.bn = MaskedBatchNorm1d(hidden_dim)
        self.mlp_out = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``x [B, N, D]`` (with ``mask [B, N]``) or ``[B, D]`` -> same leading shape, out_dim."""
        lead = x.shape[:-1]
        rows = x.reshape(-1, x.shape[-1])
        valid = None if mask is None else mask.reshape(-1)
        hidden = F.relu(self.bn(self.mlp_in(rows), valid))
        return self.fc(x) + self.mlp_out(hidden).reshape(*lead, -1)


class TokenProjection(nn.Module):
    """Per-token Linear (Xavier init) with optional L2 normalisation; padding rows are zeroed so an
    encoding can be concatenated and padded further without changing any result."""

    def __init__(self, in_dim: int, out_dim: int, normalize: bool = True) -> None:
        super().__init__()
        self.fc = xavier_linear(in_dim, out_dim)
        self.normalize = normalize

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        out = self.fc(x)
        if self.normalize:
            out = l2norm(out)
        return out.masked_fill(~mask.unsqueeze(-1), 0)


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


def mrsw(img: Tensor, img_mask: Tensor, txt: Tensor, txt_mask: Tensor) -> Tensor:
    """TERAN's MrSw of aligned pairs -> ``[P]``: for each valid word the max cosine over valid
    regions, summed over words. Padding regions are excluded from the max (-inf, not 0, so no hidden
    ReLU); a pair whose image has no valid region scores 0. Inputs already L2-normalised."""
    sims = torch.einsum("pwc,prc->pwr", txt, img)                                    # [P, W, R]
    best = masked_max(sims, img_mask.unsqueeze(1), dim=2)                            # [P, W]
    return best.masked_fill(~txt_mask, 0).sum(dim=1)


def mrsw_block(img: Tensor, img_mask: Tensor, txt: Tensor, txt_mask: Tensor) -> Tensor:
    """MrSw of every image of a block against every caption -> ``[I, T]``, one matrix product:
    ``img [I, R, C]``, ``img_mask [I, R]``, ``txt [T, W, C]``, ``txt_mask [T, W]``.
    Memory ``I*R*T*W`` similarities; callers bound it by the block size."""
    n_img, n_reg, dim = img.shape
    n_txt, n_word, _ = txt.shape
    sims = (txt.reshape(-1, dim) @ img.reshape(-1, dim).transpose(0, 1))
    sims = sims.view(n_txt, n_word, n_img, n_reg)
    best = masked_max(sims, img_mask.view(1, 1, n_img, n_reg), dim=3)                # [T, W, I]
    return best.masked_fill(~txt_mask.unsqueeze(-1), 0).sum(dim=1).transpose(0, 1)


__all__ = ["l2norm", "strip_special", "masked_mean", "masked_max", "masked_softmax",
           "masked_logsumexp", "masked_topk_mean",
           "sinusoid_codes", "GPO", "xavier_linear", "MaskedBatchNorm1d", "ResidualMLPProjection",
           "TokenProjection", "max_mean_alignment", "mrsw", "mrsw_block"]
