"""``tail``: the tokens of a cache written at an intermediate layer K, run through the backbone's
blocks after K and its final norm (`backbones.tails`), which are trained with the head; the frozen
lower blocks never run."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from backbones.encoders import group_depths
from cache.batch import TokenBatch
from cache.store import ImageCache, TextCache
from heads.base import FeatureSpec
from heads.sources.registry import SourceOptions, TokenSource, register_source

if TYPE_CHECKING:
    from heads.sources.registry import Encoder


@register_source("tail")
class TailTokens(TokenSource):
    """Layer-K cached tokens through the backbone's ``tail`` (an `backbones.tails` tail: transformer
    blocks ``tail.blocks.<i>.*`` for backbone block i and ``tail.norm.*``, or a CNN's stages after
    K). A transformer tail keeps the token positions, and padding positions of its output are zero
    as the cached batches' are; a CNN tail (``tail.layout``) turns the layer-K grid into the last
    layer's tokens, every one of them valid (image caches have no padding)."""

    tuned = True
    token_drop = False
    export_note = "tail from layer {layer}"

    def __init__(self, tail: nn.Module) -> None:
        super().__init__()
        self.tail = tail

    @classmethod
    def from_cache(cls, cache: ImageCache | TextCache, options: SourceOptions) -> TailTokens:
        from backbones.tails import tail_from_cache

        source = cls(tail_from_cache(cache))
        source.set_grad_checkpointing(options.grad_checkpointing)
        return source

    @classmethod
    def export_layer(cls, features: Mapping[str, Any]) -> int:
        return features["layer"]

    @classmethod
    def for_export(cls, encoder: Encoder, where: str) -> TailTokens:
        from backbones.tails import tail_of

        return cls(tail_of(encoder, where))

    def layer_depths(self, names: list[str]) -> dict[str, int]:
        depths = group_depths(self.tail.group_matcher(), [n.removeprefix("tail.") for n in names])
        return {name: depths[name.removeprefix("tail.")] for name in names}

    def forward(self, batch: TokenBatch) -> TokenBatch:
        tokens = self.tail(batch.tokens, batch.mask)
        if tokens.shape[1] != batch.mask.shape[1]:
            mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
            return TokenBatch(tokens, mask)
        return TokenBatch(tokens * batch.mask.unsqueeze(-1).to(tokens.dtype), batch.mask)

    def output_spec(self, cached: FeatureSpec) -> FeatureSpec:
        layout = getattr(self.tail, "layout", None)
        if layout is None:
            return cached
        return dataclasses.replace(cached, dim=layout.dim, num_tokens=layout.num_tokens,
                                   prefix_tokens=layout.prefix_tokens, grid=layout.grid)

    def set_grad_checkpointing(self, enabled: bool) -> None:
        """Recompute the tail's activations in the backward pass (less memory)."""
        self.tail.checkpointing = enabled
