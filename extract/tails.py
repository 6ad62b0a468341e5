"""Tails: the part of a backbone after layer K, run (and tuned) on the tokens of a layer-K cache.

A cache written at an intermediate layer K (``cli extract --layer K`` / ``--text-layer K``) holds
the states after the backbone's lower blocks. ``tail_from_cache(cache)`` loads the same weights
again (the cache's ``encoder`` and ``weights_id``; they must hash to its ``weights_hash``) and keeps
only what runs after layer K, so that ``tail(tokens, mask)`` on the cached tokens is the backbone's
final output (what a ``layer = -1`` cache holds) while the lower blocks never run:

======================== ================== ===============================================
encoder                  cache layer K      tail
======================== ================== ===============================================
bert, minilm             hidden_states[K]   encoder layers K..L-1 (BERT has no final norm)
dinov2, vit              hidden_states[K]   encoder layers K..L-1, then the final layernorm
timm (VisionTransformer) output of block K  blocks K+1.., then the final norm
======================== ================== ===============================================

Text tails attend only over the valid tokens of each caption (the mask, as transformers' own
forward builds it); image tails attend over every token, as the backbone did (image caches of
these backbones have no padding). The blocks keep their index in the backbone: the tail's
``blocks.<i>`` is the backbone's block i. Other backbones (Swin, EfficientNet-Lite0, timm CNNs,
imported region features) have no tail yet: an `InputError` naming the cache.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from transformers.masking_utils import create_bidirectional_mask

from cache.errors import InputError
from cache.store import ImageCache, TextCache


class Tail(nn.Module):
    """Backbone blocks after layer K (``blocks``, keyed by their index) and the final ``norm``.

    ``mask_config`` is the transformers config whose attention implementation the padding mask is
    built for (text tails); None: every token attends to every token (image tails).
    """

    def __init__(self, blocks: dict[int, nn.Module], norm: nn.Module,
                 mask_config: Any = None) -> None:
        super().__init__()
        self.blocks = nn.ModuleDict({str(i): block for i, block in blocks.items()})
        self.norm = norm
        self.mask_config = mask_config

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Final states ``[B, T, D]`` from layer-K states ``[B, T, D]`` (``mask``: True = valid)."""
        attention = None
        if self.mask_config is not None:   # materialised even without padding: deciding to
            attention = create_bidirectional_mask(  # skip it would read the mask on the host
                config=self.mask_config, inputs_embeds=tokens, attention_mask=mask,
                allow_is_bidirectional_skip=False)
        for block in self.blocks.values():
            tokens = block(tokens) if attention is None else block(tokens, attention)
        return self.norm(tokens)


TailFactory = Callable[[nn.Module, int, str], Tail]
_TAILS: dict[str, TailFactory] = {}


def register_tail(*encoders: str) -> Callable[[TailFactory], TailFactory]:
    """Decorator registering ``factory(backbone model, layer K, cache path) -> Tail`` for the named
    encoders of `extract.backbones`."""

    def decorate(factory: TailFactory) -> TailFactory:
        for name in encoders:
            if name in _TAILS:
                raise ValueError(f"tail of {name!r} registered twice")
            _TAILS[name] = factory
        return factory

    return decorate


def tail_encoders() -> list[str]:
    """Encoders whose caches can feed a tail."""
    return sorted(_TAILS)


def tail_from_cache(cache: ImageCache | TextCache) -> Tail:
    """The tail of the backbone that wrote ``cache`` at layer K, with the pretrained weights.

    InputError naming the cache: a last-layer cache, an encoder without a tail, weights that cannot
    be loaded or that do not hash to the cache's ``weights_hash``."""
    from extract.backbones import create_image_encoder, create_text_encoder

    attrs, where = cache.attrs, cache.path
    if attrs.layer < 0:
        raise InputError(f"{where}: written at the backbone's last layer (layer {attrs.layer}); a "
                         "tail needs a cache of an intermediate layer K (cli extract --layer K or "
                         "--text-layer K)")
    if attrs.encoder not in _TAILS:
        raise InputError(f"{where}: tail not supported for this backbone yet (encoder "
                         f"{attrs.encoder!r}; tails exist for {', '.join(tail_encoders())})")
    try:
        if attrs.modality == "image":
            encoder = create_image_encoder(attrs.encoder, attrs.weights_id, attrs.layer,
                                           attrs.resolution)
        else:
            encoder = create_text_encoder(attrs.encoder, attrs.weights_id, attrs.layer,
                                          attrs.num_tokens)
    except InputError as err:
        raise InputError(f"{where}: cannot load the backbone for its tail: {err}") from err
    if encoder.weights_hash != attrs.weights_hash:
        raise InputError(f"{where}: the weights {attrs.weights_id} hash to {encoder.weights_hash}, "
                         f"but the cache was written with weights {attrs.weights_hash}; they "
                         "changed since extraction (restore them or extract again)")
    tail = _TAILS[attrs.encoder](encoder.model, attrs.layer, str(where))
    return tail.train().requires_grad_(True)


@register_tail("bert", "minilm")
def _bert_tail(model: nn.Module, layer: int, where: str) -> Tail:
    layers = model.encoder.layer
    if layer >= len(layers):
        raise InputError(f"{where}: layer {layer} is the output of the last of {len(layers)} "
                         "layers and BERT has no final norm: its tail would be empty (extract "
                         "an earlier --text-layer)")
    return Tail({i: layers[i] for i in range(layer, len(layers))}, nn.Identity(), model.config)


def _blocks_and_norm(layers: nn.ModuleList, first: int, norm: nn.Module) -> Tail:
    """Blocks ``first``.. of ``layers``, then ``norm`` (every token attends to every token)."""
    return Tail({i: layers[i] for i in range(first, len(layers))}, norm)


@register_tail("dinov2")
def _dinov2_tail(model: nn.Module, layer: int, where: str) -> Tail:
    return _blocks_and_norm(model.encoder.layer, layer, model.layernorm)


@register_tail("vit")
def _vit_tail(model: nn.Module, layer: int, where: str) -> Tail:
    return _blocks_and_norm(model.layers, layer, model.layernorm)


@register_tail("timm")
def _timm_tail(model: nn.Module, layer: int, where: str) -> Tail:
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise InputError(f"{where}: tail not supported for this backbone yet (timm "
                         f"{type(model).__name__}; timm tails exist for VisionTransformer models)")
    return _blocks_and_norm(model.blocks, layer + 1, model.norm)
