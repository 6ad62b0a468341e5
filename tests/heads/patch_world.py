"""Synthetic patch-grid images for the LAPS / CAA / HREM tests, and naive per-pair references.

``GridWorld`` extends ``synthetic_pairs.SyntheticWorld`` (concepts shared by images and captions):
an image is a CLS token (the mean of its patches) followed by an H x W grid of patches in raster
order; each concept it shows covers a horizontal pair of neighbouring patches, the other patches are
random distractors. Captions are the world's (concept words + stop words, garbage padding).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from heads.base import FeatureSpec
from tests.heads.synthetic_pairs import SyntheticWorld


class GridWorld(SyntheticWorld):
    """Images on a ``grid`` with one prefix token; ``FeatureSpec`` with grid and token count."""

    def __init__(self, seed: int = 0, grid: tuple[int, int] = (4, 4), **options) -> None:
        super().__init__(seed=seed, **options)
        self.grid = grid
        self.image_spec = FeatureSpec("image", self.img_basis.shape[1], encoder="synthetic",
                                      num_tokens=1 + grid[0] * grid[1], prefix_tokens=1,
                                      grid=grid)

    def _image(self, concepts: Tensor) -> Tensor:
        h, w = self.grid
        dim = self.img_basis.shape[1]
        patches = torch.randn(h * w, dim, generator=self.g)
        starts = torch.randperm(h * (w // 2), generator=self.g)[:len(concepts)] * 2
        for concept, start in zip(concepts.tolist(), starts.tolist()):
            patches[start:start + 2] = self.img_basis[concept]
        patches = patches + self.noise * torch.randn(patches.shape, generator=self.g)
        return torch.cat([patches.mean(0, keepdim=True), patches])


def naive_max_mean(words: Tensor, visual: Tensor, slope: float = 0.1) -> Tensor:
    """Bidirectional max-mean of one pair from raw (unnormalised) word and visual tokens."""
    sims = F.leaky_relu(F.normalize(words, dim=-1) @ F.normalize(visual, dim=-1).t(), slope)
    return sims.max(dim=1).values.mean() + sims.max(dim=0).values.mean()


def naive_slimmed_set(head, cls: Tensor | None, values: Tensor, words: Tensor,
                      prior: Tensor | None = None, keep_prob: Tensor | None = None) -> Tensor:
    """LAPS's visual set of one pair, straight from the paper's steps: ``values [N, C]`` projected
    patch tokens, ``words [L, C]`` valid projected words, ``prior [N]`` an extra selection score,
    ``keep_prob [N]`` the score network's keep probability (mixed with weight 1 - beta); the head
    supplies K, M, beta and the aggregation MLP."""
    slim = head.slimming
    a = F.cosine_similarity(values, values.mean(0, keepdim=True), dim=-1)
    b = F.cosine_similarity(values, words.mean(0, keepdim=True), dim=-1)
    s = a + b + (prior if prior is not None else 0)
    if keep_prob is not None:
        s = slim.attention_weight * s + (1 - slim.attention_weight) * keep_prob
    order = torch.argsort(s, descending=True)
    keep, drop = order[:slim.num_keep], order[slim.num_keep:]
    kept = values[keep]
    weights = torch.softmax(slim.aggregator.mlp(kept) * slim.aggregator.scale, dim=0)   # [K, M]
    aggregated = weights.t() @ kept
    fused = torch.softmax(s[drop], dim=0) @ values[drop]
    parts = ([cls.unsqueeze(0)] if cls is not None else []) + [aggregated, fused.unsqueeze(0)]
    return torch.cat(parts)
