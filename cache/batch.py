"""The batch type that cache readers produce and heads consume."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class TokenBatch:
    """Padded token features of a batch: ``tokens [B, T, D]`` and ``mask [B, T]`` (True = valid)."""

    tokens: Tensor
    mask: Tensor

    @property
    def lengths(self) -> Tensor:
        return self.mask.sum(dim=1)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None,
           non_blocking: bool = True) -> "TokenBatch":
        return TokenBatch(self.tokens.to(device, dtype=dtype, non_blocking=non_blocking),
                          self.mask.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "TokenBatch":
        return TokenBatch(self.tokens.pin_memory(), self.mask.pin_memory())

    def index(self, rows: Tensor) -> "TokenBatch":
        """Rows of the batch, trimmed to their longest valid length."""
        mask = self.mask[rows]
        width = int(mask.sum(1).max().item()) if mask.numel() else 0
        return TokenBatch(self.tokens[rows][:, :width], mask[:, :width])
