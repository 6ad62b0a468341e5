"""VSE∞'s Generalised Pooling Operator and the sinusoidal codes it reads."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


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
