"""Tails: the part of a backbone after layer K, run (and tuned) on the tokens of a layer-K cache.

A cache written at an intermediate layer K (``cli extract --layer K`` / ``--text-layer K``) holds
the states after the backbone's lower blocks. ``tail_from_cache(cache)`` loads the same weights
again (the cache's ``encoder`` and ``weights_id``; they must hash to its ``weights_hash``) and keeps
only what runs after layer K, so that ``tail(tokens, mask)`` on the cached tokens is the backbone's
final output (what a ``layer = -1`` cache holds) while the lower blocks never run:

=========================== ================== ============================================
encoder                     cache layer K      tail
=========================== ================== ============================================
bert, minilm                hidden_states[K]   encoder layers K..L-1 (BERT has no final norm)
dinov2, vit                 hidden_states[K]   encoder layers K..L-1, then the final layernorm
timm (VisionTransformer)    output of block K  blocks K+1.., then the final norm
efficientnet_lite0/2, timm  output of stage K  what ``forward_features`` runs after stage K
(feature maps: CNNs)        (feature_info[K])  (EfficientNet: the later ``blocks``, ``conv_head``,
                                               ``bn2``; ResNet: the later ``layer<i>``)
=========================== ================== ============================================

Text tails attend only over the valid tokens of each caption (the mask, as transformers' own
forward builds it); image tails attend over every token, as the backbone did (image caches of
these backbones have no padding). The blocks keep their index in the backbone: the tail's
``blocks.<i>`` is the backbone's block i. A feature-map tail (`StageTail`) drops the mean token,
folds the grid back into a ``[B, C, H, W]`` map, runs the modules after stage K under their
backbone names and lays the result out as the extraction does (the grid mean, then the grid in
raster order), so it gives other tokens than it takes (``StageTail.layout``); its BatchNorm layers
stay in eval mode, even when it trains. Other backbones (Swin, timm models whose
``forward_features`` is not their stages in order, imported region features) have no tail yet:
an `InputError` naming the cache.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers.masking_utils import create_bidirectional_mask

from backbones.encoders import GroupMatcher, ImageEncoder, TextEncoder, TokenLayout
from backbones.recorded import recorded_encoder
from backbones.timm_backbones import flatten_grid, token_layout, with_mean_token
from cache.errors import InputError
from cache.store import ImageCache, TextCache

BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def freeze_batchnorm(module: nn.Module) -> None:
    """Put the BatchNorm layers of ``module`` in eval mode: their running statistics stop
    changing, their affine weights still train."""
    for norm in module.modules():
        if isinstance(norm, BATCH_NORMS):
            norm.eval()


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
        self.checkpointing = False       # recompute block activations in backward (training)

    def group_matcher(self) -> GroupMatcher:
        """Its parameter groups: the blocks by their backbone index, then the final norm."""
        return dict(blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Final states ``[B, T, D]`` from layer-K states ``[B, T, D]`` (``mask``: True = valid)."""
        attention = None
        if self.mask_config is not None:   # materialised even without padding: deciding to
            attention = create_bidirectional_mask(  # skip it would read the mask on the host
                config=self.mask_config, inputs_embeds=tokens, attention_mask=mask,
                allow_is_bidirectional_skip=False)
        for block in self.blocks.values():
            args = (tokens,) if attention is None else (tokens, attention)
            tokens = _run(block, args, self.checkpointing and self.training)
        return self.norm(tokens)


class StageTail(nn.Module):
    """The modules a feature-map model runs after stage K, on layer-K tokens (mean token + grid).

    ``modules``: ``(backbone name, module)`` in the order ``forward_features`` runs them; each is
    kept under its backbone name (``blocks.5``, ``conv_head``, ``bn2``). ``grid``: the layer-K
    (H, W); ``layout``: the tokens the tail gives, those of the backbone's last layer; ``groups``:
    the backbone's parameter groups. BatchNorm
    layers stay in eval mode whatever ``train()`` says: running statistics never change, their
    affine weights still train (CNN fine-tuning as the references do it).
    """

    def __init__(self, modules: list[tuple[str, nn.Module]], grid: tuple[int, int],
                 layout: TokenLayout, groups: GroupMatcher) -> None:
        super().__init__()
        for name, module in modules:       # flattened names hold at most one dot: blocks.5
            parent, _, leaf = name.rpartition(".")
            if parent and parent not in self._modules:
                self.add_module(parent, nn.ModuleDict())
            self.get_submodule(parent).add_module(leaf, module)
        self.order = [name for name, _ in modules]
        self.grid = grid
        self.layout = layout
        self.groups = groups
        self.checkpointing = False       # recompute stage activations in backward (training)

    def group_matcher(self) -> GroupMatcher:
        """Its parameter groups: the backbone's, whose names its modules keep."""
        return self.groups

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Final tokens ``[B, layout.num_tokens, layout.dim]`` from layer-K tokens
        ``[B, 1 + H * W, C]``; ``mask`` is not read (image caches have no padding)."""
        features = tokens[:, 1:].transpose(1, 2).unflatten(2, self.grid).contiguous()
        for name in self.order:
            features = _run(self.get_submodule(name), (features,),
                            self.checkpointing and self.training)
        return with_mean_token(flatten_grid(features))

    def train(self, mode: bool = True) -> StageTail:
        super().train(mode)
        freeze_batchnorm(self)
        return self


def _run(module: nn.Module, args: tuple[Any, ...], checkpoint: bool) -> torch.Tensor:
    """``module(*args)``, its activations recomputed in the backward pass when ``checkpoint``."""
    if checkpoint and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(module, *args, use_reentrant=False)
    return module(*args)


AnyTail = Tail | StageTail
Encoder = ImageEncoder | TextEncoder
TailFactory = Callable[[Encoder, str], AnyTail]
_TAILS: dict[str, TailFactory] = {}


def register_tail(*encoders: str) -> Callable[[TailFactory], TailFactory]:
    """Decorator registering ``factory(loaded encoder at layer K, where) -> tail`` for the named
    encoders of `backbones.registry` (``where`` names the cache in errors)."""

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


def _check_has_tail(encoder: str, where: str) -> None:
    if encoder not in _TAILS:
        raise InputError(f"{where}: tail not supported for this backbone yet (encoder "
                         f"{encoder!r}; tails exist for {', '.join(tail_encoders())})")


def tail_from_cache(cache: ImageCache | TextCache) -> AnyTail:
    """The tail of the backbone that wrote ``cache`` at layer K, with the pretrained weights.

    InputError naming the cache: a last-layer cache, an encoder without a tail, weights that cannot
    be loaded or that do not hash to the cache's ``weights_hash``."""
    attrs, where = cache.attrs, cache.path
    if attrs.layer < 0:
        raise InputError(f"{where}: written at the backbone's last layer (layer {attrs.layer}); a "
                         "tail needs a cache of an intermediate layer K (cli extract --layer K or "
                         "--text-layer K)")
    _check_has_tail(attrs.encoder, str(where))
    return tail_of(recorded_encoder(attrs.modality, attrs, str(where)), str(where))


def tail_of(encoder: Encoder, where: str) -> AnyTail:
    """The trainable tail after ``encoder.layer`` of a loaded encoder (``where`` names what asks
    in errors); the encoder's model lends it its modules."""
    _check_has_tail(encoder.name, where)
    return _TAILS[encoder.name](encoder, where).train().requires_grad_(True)


@register_tail("bert", "minilm")
def _bert_tail(encoder: Encoder, where: str) -> Tail:
    model, layer = encoder.model, encoder.layer
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
def _dinov2_tail(encoder: Encoder, where: str) -> Tail:
    return _blocks_and_norm(encoder.model.encoder.layer, encoder.layer, encoder.model.layernorm)


@register_tail("vit")
def _vit_tail(encoder: Encoder, where: str) -> Tail:
    return _blocks_and_norm(encoder.model.layers, encoder.layer, encoder.model.layernorm)


@register_tail("timm")
def _timm_tail(encoder: Encoder, where: str) -> AnyTail:
    from timm.models.vision_transformer import VisionTransformer

    model = encoder.model
    if isinstance(model, VisionTransformer):
        return _blocks_and_norm(model.blocks, encoder.layer + 1, model.norm)
    if getattr(model, "num_prefix_tokens", None) is None:       # tokens of a feature map
        return _stage_tail(encoder, where)
    raise InputError(f"{where}: tail not supported for this backbone yet (timm "
                     f"{type(model).__name__}; timm tails exist for VisionTransformer and "
                     "feature-map models)")


@register_tail("efficientnet_lite0", "efficientnet_lite2")
def _stage_tail(encoder: Encoder, where: str) -> StageTail:
    """A timm feature-map model: the modules ``forward_features`` runs after stage K."""
    model, layer = encoder.model, encoder.layer
    modules = _after_stage(model, layer)
    if modules is None:
        raise InputError(f"{where}: tail not supported for this backbone yet (timm "
                         f"{type(model).__name__}: its forward_features is not its stages run one "
                         "after the other on NCHW maps)")
    if not any(p.numel() for _, module in modules for p in module.parameters()):
        raise InputError(f"{where}: layer {layer} ({model.feature_info[layer]['module']}) is the "
                         "model's last stage and forward_features adds no weights after it: its "
                         "tail would be empty (extract an earlier --layer)")
    return StageTail(modules, encoder.layout.grid,
                     token_layout(model, where, -1, encoder.resolution), encoder.group_matcher())


def _after_stage(model: nn.Module, layer: int) -> list[tuple[str, nn.Module]] | None:
    """``(name, module)`` that ``forward_features`` runs after stage ``layer``, in order.

    The model is read as timm's ``features_only`` wrappers (``FeatureDictNet``) read it: its
    children in order, a Sequential container flattened one level where ``feature_info`` names its
    children (``blocks.4``), stage K being the module ``feature_info[K]`` names. The modules after
    it, up to the one whose output is ``forward_features``, are the tail; on a small random input
    that walk must reproduce both ``forward_intermediates`` at K and ``forward_features`` (the
    model in eval mode, as encoders are loaded), else None: not a staged model.
    """
    stages = {info["module"] for info in model.feature_info}
    modules = []
    for name, child in model.named_children():
        if isinstance(child, nn.Sequential) and any(s.startswith(f"{name}.") for s in stages):
            modules += [(f"{name}.{sub}", module) for sub, module in child.named_children()]
        else:
            modules.append((name, child))
    side = 2 * int(model.feature_info[-1]["reduction"])
    features = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(0))
    features = features.to(next(model.parameters()).device)
    stage_name, start = model.feature_info[layer]["module"], None
    try:
        with torch.no_grad():
            (stage,) = model.forward_intermediates(features, indices=[layer], norm=False,
                                                   stop_early=True, intermediates_only=True)
            final = model.forward_features(features)
            for i, (name, module) in enumerate(modules):
                features = module(features)
                if name == stage_name:
                    if not _same(features, stage):
                        return None
                    start = i + 1
                if start is not None and _same(features, final):
                    return modules[start:i + 1]
    except (RuntimeError, ValueError, AssertionError):   # a fixed input size (MaxViT), a head
        return None                                      # that cannot take a feature map
    return None


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5)
