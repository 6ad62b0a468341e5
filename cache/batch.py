"""The batch types that readers produce and token sources consume.

* `TokenBatch`: token features (a cache's tokens, or what a token source made of its input), what
  every head reads;
* `IdsBatch`: word-piece ids of captions, what an end-to-end text source reads;
* `PixelBatch`: normalised images, what an end-to-end image source reads.

All three move with ``.to(device, dtype)`` (``dtype`` applies to float features only: ids stay
integers) and pin with ``.pin_memory()``, so the training loop and the scorer treat them alike.
"""
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


@dataclass
class IdsBatch:
    """Right-padded word-piece ids ``input_ids [B, L]`` (int64) and ``mask [B, L]`` (True = valid)."""

    input_ids: Tensor
    mask: Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None,
           non_blocking: bool = True) -> "IdsBatch":
        return IdsBatch(self.input_ids.to(device, non_blocking=non_blocking),
                        self.mask.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "IdsBatch":
        return IdsBatch(self.input_ids.pin_memory(), self.mask.pin_memory())


@dataclass
class PixelBatch:
    """Normalised images ``pixels [B, 3, H, W]``."""

    pixels: Tensor

    def __len__(self) -> int:
        return self.pixels.shape[0]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None,
           non_blocking: bool = True) -> "PixelBatch":
        return PixelBatch(self.pixels.to(device, dtype=dtype, non_blocking=non_blocking))

    def pin_memory(self) -> "PixelBatch":
        return PixelBatch(self.pixels.pin_memory())


def as_cached(tokens: Tensor, mask: Tensor | None = None) -> TokenBatch:
    """Backbone states ``[B, T, D]`` as a cache hands them back: no graph, rounded to fp16 and
    back to float32, padding zero (``mask``: True = valid; default every token)."""
    if mask is None:
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
    mask = mask.bool()
    rounded = tokens.detach().half().float() * mask.unsqueeze(-1)
    return TokenBatch(rounded, mask)


InputBatch = TokenBatch | IdsBatch | PixelBatch
"""What a DataLoader gives a side's token source."""
