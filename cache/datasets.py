"""Torch-side access to caches: token batches for encoding, pairs for training."""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch

from cache.batch import TokenBatch
from cache.store import ImageCache, TextCache


def to_token_batch(tokens: np.ndarray, lengths: np.ndarray) -> TokenBatch:
    """Wrap padded fp16 tokens ``[B, T, D]`` and valid lengths ``[B]`` as a TokenBatch (CPU)."""
    tokens_t = torch.from_numpy(np.ascontiguousarray(tokens))
    lengths_t = torch.from_numpy(np.asarray(lengths, np.int64))
    mask = torch.arange(tokens_t.shape[1]).unsqueeze(0) < lengths_t.unsqueeze(1)
    return TokenBatch(tokens_t, mask)


def token_batches(cache: ImageCache | TextCache, batch_size: int,
                  rows: Sequence[int] | np.ndarray | None = None) -> Iterator[tuple[np.ndarray, TokenBatch]]:
    """Consecutive batches of ``rows`` (default: every row once, in order) as (rows, TokenBatch)."""
    rows = np.arange(len(cache)) if rows is None else np.asarray(rows, np.int64)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        tokens, lengths = cache.read(chunk)
        yield chunk, to_token_batch(tokens, lengths)
