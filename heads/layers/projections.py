"""Projections of cached tokens: Xavier linears, masked BatchNorm, VSE∞'s residual MLP."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from heads.layers.masked import l2norm

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
