"""What every backbone wrapper is: the token layout it writes, the image / text encoder
interfaces that the extraction runner drives (`backbones.registry` registers the backbones), and
the parameter groups of its model (timm's ``group_matcher``, for layer-wise lr decay)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from backbones.transforms import ImageTransform
from backbones.weights import WeightsSource, state_dict_hash
from cache.errors import InputError


@dataclass(frozen=True)
class TokenLayout:
    """Token layout of an image encoder's output, as recorded in a feature cache.

    ``num_tokens`` T = ``prefix_tokens`` (CLS, registers, pooled token) + spatial tokens;
    ``grid`` is the spatial (H, W) grid in raster order after the prefix, None for regions.
    """

    num_tokens: int
    dim: int
    prefix_tokens: int
    grid: tuple[int, int] | None

    def __post_init__(self) -> None:
        if self.grid is not None and self.num_tokens != self.prefix_tokens + self.grid[0] * self.grid[1]:
            raise ValueError(f"inconsistent layout: {self}")


GroupMatcher = Mapping[str, Any]
"""timm's parameter-group matcher: ``{"stem": REGEX, "blocks": REGEX | [(REGEX, None | (N,)),
...]}``, each REGEX matched at the start of a parameter name; a block REGEX captures the block's
index, a ``(N,)`` suffix puts what it matches after every block (final norm, head conv)."""


def group_matcher(model: nn.Module, declared: GroupMatcher | None) -> GroupMatcher:
    """The coarse parameter groups (one per block or stage) of a backbone's ``model``: a timm
    model's own ``group_matcher``, else what its factory ``declared``."""
    if hasattr(model, "group_matcher"):
        return model.group_matcher(coarse=True)
    if declared is None:
        raise ValueError(f"{type(model).__name__}: no parameter groups declared")
    return declared


def group_depths(matcher: GroupMatcher, names: Sequence[str]) -> dict[str, int]:
    """timm's ``param_groups_layer_decay`` depths of a backbone's parameter ``names`` under
    ``matcher``: the stem is layer 0, block i layer i + 1, whatever comes after the last block (a
    ``(N,)`` suffix, or no group at all: final norm, head) layer L + 1, L the last block index + 1
    (so a tail, which keeps the backbone's block indices, keeps their depths); a parameter's depth
    is L + 1 minus its layer."""
    rules = []
    for group, spec in matcher.items():
        for regex, suffix in ([(spec, None)] if isinstance(spec, str) else spec):
            rules.append((re.compile(regex), group == "stem", suffix is not None))
    layers: dict[str, int | None] = {}
    for name in names:
        layers[name] = None                                     # after the last block
        for regex, stem, after in rules:
            found = regex.match(name)
            if found:
                layers[name] = 0 if stem else None if after else int(found.group(1)) + 1
                break
    top = max((layer for layer in layers.values() if layer), default=0) + 1
    return {name: 0 if layer is None else top - layer for name, layer in layers.items()}


class ImageEncoder(nn.Module):
    """An image backbone wrapped to return tokens ``[B, T, D]``: prefix tokens first, then the grid.

    Attributes: ``name``, ``weights_id``, ``weights_hash``, ``weights_note`` (what the weights really
    are, "" if the id says it), ``layer``, ``resolution``, ``layout``, ``transform`` (picklable
    `ImageTransform`), ``preprocessing`` (its JSON-able description) and ``groups`` (the
    parameter groups of a model that is not timm's, `group_matcher`). ``weights_hash``
    defaults to the model's `state_dict_hash`; pass it where the weights were hashed as loaded.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        name: str,
        source: WeightsSource,
        layer: int,
        resolution: int,
        layout: TokenLayout,
        transform: ImageTransform,
        weights_hash: str | None = None,
        groups: GroupMatcher | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.groups = groups
        self.name = name
        self.weights_id = source.weights_id
        self.weights_hash = state_dict_hash(model) if weights_hash is None else weights_hash
        self.weights_note = source.note
        self.layer = layer
        self.resolution = resolution
        self.layout = layout
        self.transform = transform
        self.preprocessing = transform.to_dict()

    def group_matcher(self) -> GroupMatcher:
        """The parameter groups of ``model`` (see `group_matcher`)."""
        return group_matcher(self.model, self.groups)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Tokens ``[B, T, D]`` of normalised pixels ``[B, 3, resolution, resolution]``."""
        raise NotImplementedError

    def forward_layers(self, pixels: torch.Tensor, encoders: Sequence["ImageEncoder"]) -> list[torch.Tensor]:
        """The tokens of each of ``encoders`` (this backbone at other layers, see
        `extract.runner.check_shared_backbone`) for the same pixels. This base runs one forward per
        encoder; backbones that return every layer in one pass override it."""
        return [encoder(pixels) for encoder in encoders]


class TextEncoder(nn.Module):
    """A BERT-style text encoder returning the hidden states of ``layer`` for every token.

    Attributes: ``name``, ``weights_id``, ``weights_hash``, ``weights_note``, ``layer``, ``dim``,
    ``max_length``, ``tokenizer`` (the transformers tokenizer stored with the weights), ``groups``
    (its model's parameter groups, `group_matcher`).
    """

    def __init__(self, model: nn.Module, tokenizer, *, name: str, source: WeightsSource, layer: int, max_length: int,
                 groups: GroupMatcher | None = None):
        super().__init__()
        self.model = model
        self.groups = groups
        self.tokenizer = tokenizer
        self.name = name
        self.weights_id = source.weights_id
        self.weights_hash = state_dict_hash(model)
        self.weights_note = source.note
        self.layer = layer
        self.dim = model.config.hidden_size
        self.max_length = max_length

    def group_matcher(self) -> GroupMatcher:
        """The parameter groups of ``model`` (see `group_matcher`)."""
        return group_matcher(self.model, self.groups)

    def tokenize(self, captions: Sequence[str]) -> list[list[int]]:
        """Token ids with [CLS] ... [SEP], truncated to ``max_length``."""
        encoded = self.tokenizer(list(captions), truncation=True, max_length=self.max_length, add_special_tokens=True)
        return encoded["input_ids"]

    def pad_batch(self, token_ids: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad token id lists into ``input_ids`` and ``attention_mask`` LongTensors ``[B, L]``."""
        length = max((len(ids) for ids in token_ids), default=0)
        input_ids = torch.full((len(token_ids), length), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(token_ids), length), dtype=torch.long)
        for row, ids in enumerate(token_ids):
            input_ids[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
        return input_ids, attention_mask

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Hidden states ``[B, L, D]`` of ``layer`` (padding positions are not meaningful)."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=self.layer != -1)
        return out.last_hidden_state if self.layer == -1 else out.hidden_states[self.layer]


def patch_grid(name: str, resolution: int, stride: int) -> tuple[int, int]:
    """The (H, W) grid of a square input at ``resolution`` with this ``stride`` (InputError if it
    does not divide)."""
    if resolution <= 0 or resolution % stride:
        raise InputError(f"{name}: resolution must be a positive multiple of {stride}, got {resolution}")
    return resolution // stride, resolution // stride
