"""The token source registry: what a side of a head reads, declared by one plugin per kind.

``data.image_source`` / ``data.text_source`` name a registered kind per side (``cache``, ``tail``,
``e2e`` ship with the toolkit, one module each in this package). A kind is a `TokenSource`
subclass registered with ``@register_source("name")``; everything the toolkit needs to know about
the kind is declared on that class, so no caller branches on a kind's name:

=============================== =================================================================
declaration                     meaning (who reads it)
=============================== =================================================================
``from_cache(cache, options)``  the source of one side, built from the backbone a cache recorded
                                (its ``encoder``, ``weights_id`` checked by hash, ``layer``), with
                                the run's `SourceOptions` (`heads.model.create_model`)
``reads``                       what ``forward`` takes: ``"tokens"`` (`TokenBatch`), ``"pixels"``
                                (`PixelBatch`) or ``"ids"`` (`IdsBatch`)
``tuned``                       has weights that train with the head; checkpoints keep their state
                                under ``sources`` (`heads.model.RetrievalModel.tuned_states`)
``token_drop``                  feature-level token drop applies to it in training
``epoch_unit``                  ``"captions"`` or ``"images"``: what one epoch visits once when
                                ``data.epoch_over`` is ``auto`` (only the image side's counts)
``output_spec(cached)``         the `FeatureSpec` the head receives, given the cache's
``encode_raw(raw, encoder)``    a photo (`PixelBatch`) or caption (`IdsBatch`) preprocessed by the
                                recorded backbone ``encoder``, as the input ``forward`` reads
                                (search, explain)
``batches`` / ``training_reader``  how a split's rows reach it (evaluation / training)
``check_inputs(cache)``         refuse early what it would read and cannot
``layer_depths(names)``         its parameter groups: each tuned parameter's depth below the
                                backbone's top, for layer-wise lr decay (``optim.layer_decay``)
``for_export`` / ``export_layer`` / ``export_note``  its export form: the source a run's tuned
                                state loads into, made of the original backbone's modules loaded
                                at ``export_layer`` (`train.export`)
=============================== =================================================================

A new kind is one module in this package (imported by ``heads/sources/__init__.py``) plus its
cases in ``tests/heads/sources/test_contract.py``, which runs the contract over every registered
kind.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator

import numpy as np
import torch
from torch import nn

from backbones.transforms import CROP_SCALE
from cache.batch import IdsBatch, InputBatch, PixelBatch, TokenBatch, as_cached
from cache.datasets import token_batches
from cache.errors import InputError
from cache.store import MODALITIES, ImageCache, TextCache
from heads.base import FeatureSpec
from heads.raw_inputs import WORD_AUGMENT

if TYPE_CHECKING:
    from backbones.encoders import ImageEncoder, TextEncoder

    Encoder = ImageEncoder | TextEncoder

EPOCH_UNITS = ("captions", "images")


@dataclass(frozen=True)
class SourceOptions:
    """What token sources read from a run config (``data`` and ``run`` keys)."""

    images_root: str | None = None              # data.images_root: e2e photos (None: recorded)
    crop_scale: tuple[float, float] = CROP_SCALE  # data.crop_scale: e2e RandomResizedCrop
    text_augment: float = WORD_AUGMENT          # data.text_augment: e2e word perturbation
    workers: int = 0                            # data.num_workers: e2e photo decoding
    grad_checkpointing: bool = False            # run.grad_checkpointing: tuned blocks

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> SourceOptions:
        data = config["data"]
        return cls(images_root=data.get("images_root"),
                   crop_scale=tuple(data.get("crop_scale", cls.crop_scale)),
                   text_augment=data.get("text_augment", cls.text_augment),
                   workers=data.get("num_workers", 0),
                   grad_checkpointing=config.get("run", {}).get("grad_checkpointing", False))


class TokenSource(nn.Module):
    """Turns what a side reads (cached tokens, or photos / captions) into the token batch its
    head reads. The defaults are those of a source without weights that reads cached tokens."""

    kind: ClassVar[str] = ""          # its registry name (set by `register_source`)
    tuned: ClassVar[bool] = False     # has weights that train with the head (saved in checkpoints)
    token_drop: ClassVar[bool] = True  # feature-level token drop applies to it in training
    export_note: ClassVar[str | None] = None
    """A tuned kind's export: how the provenance note says what was tuned (``str.format`` of the
    run's recorded features); None: nothing to export."""

    @classmethod
    def from_cache(cls, cache: ImageCache | TextCache, options: SourceOptions) -> TokenSource:
        """The source of one side for the backbone that wrote ``cache`` (its train split)."""
        raise NotImplementedError

    @classmethod
    def export_layer(cls, features: Mapping[str, Any]) -> int:
        """The layer at which the export loads the run's original backbone."""
        return -1

    @classmethod
    def for_export(cls, encoder: Encoder, where: str) -> TokenSource:
        """The source a run's tuned state loads into, made of ``encoder.model``'s own modules
        (so loading the state changes the backbone in place)."""
        raise InputError(f"{where}: a {cls.kind} source has no backbone to export")

    def forward(self, batch: InputBatch) -> TokenBatch:
        raise NotImplementedError

    @property
    def reads(self) -> str:
        """What ``forward`` takes: "tokens" (a backbone's states at the cache's layer, as a
        `TokenBatch`), "pixels" (`PixelBatch`) or "ids" (`IdsBatch`)."""
        return "tokens"

    @property
    def epoch_unit(self) -> str:
        """What an epoch visits once under ``data.epoch_over: auto`` (one of `EPOCH_UNITS`)."""
        return "captions"

    def output_spec(self, cached: FeatureSpec) -> FeatureSpec:
        """What the head receives, given the spec of the cache this source reads."""
        return cached

    def encode_raw(self, raw: PixelBatch | IdsBatch, encoder: Encoder) -> InputBatch:
        """What ``forward`` reads for a preprocessed photo or caption batch ``raw``: by default
        the recorded backbone's states at the cache's layer, as a cache holds them (fp16 values,
        no graph); ``encoder`` is moved to where ``raw`` is."""
        with torch.no_grad():
            if isinstance(raw, PixelBatch):
                return as_cached(encoder.to(raw.pixels.device)(raw.pixels))
            encoder.to(raw.input_ids.device)
            return as_cached(encoder(raw.input_ids, raw.mask.long()), raw.mask)

    def batches(self, cache: ImageCache | TextCache, batch_size: int,
                rows: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, InputBatch]]:
        """``(rows, input batch)`` of a split's rows in order, for encoding (default: the
        cached tokens)."""
        return token_batches(cache, batch_size, rows)

    def training_reader(self, cache: ImageCache | TextCache, seed: int) -> Any:
        """What training reads for this side: None for the cached tokens (with token drop), or
        an object whose ``read(rows, epoch)`` gives the side's input batch."""
        return None

    def check_inputs(self, cache: ImageCache | TextCache) -> None:
        """InputError naming what this source would read from ``cache``'s split and cannot."""

    def layer_depths(self, names: list[str]) -> dict[str, int]:
        """Its parameter groups: how many layers below its backbone's top each of its parameters
        ``names`` (as named inside the source) sits, for layer-wise lr decay (a parameter's lr is
        multiplied by ``optim.layer_decay ** depth``); the tuned kinds read their backbone's
        ``group_matcher`` (`backbones.encoders.group_depths`). Default: every one at the top."""
        return {name: 0 for name in names}


_SOURCES: dict[str, type[TokenSource]] = {}


def register_source(kind: str) -> Callable[[type[TokenSource]], type[TokenSource]]:
    """Class decorator registering a `TokenSource` subclass as ``data.<side>_source: kind``."""

    def decorate(cls: type[TokenSource]) -> type[TokenSource]:
        if kind in _SOURCES:
            raise ValueError(f"token source {kind!r} registered twice")
        cls.kind = kind
        _SOURCES[kind] = cls
        return cls

    return decorate


def list_sources() -> list[str]:
    """The registered kinds, in registration order."""
    return list(_SOURCES)


def source_class(kind: str) -> type[TokenSource]:
    """The class of a registered kind (InputError naming the known ones)."""
    if kind not in _SOURCES:
        raise InputError(f"unknown token source {kind!r}; known: {', '.join(_SOURCES)}")
    return _SOURCES[kind]


def build_source(kind: str, cache: ImageCache | TextCache,
                 options: SourceOptions = SourceOptions()) -> TokenSource:
    """The ``kind`` source of one side, for the backbone that wrote ``cache`` (its train split)."""
    return source_class(kind).from_cache(cache, options)


def source_kinds(config: Mapping[str, Any]) -> dict[str, str]:
    """``{side: source kind}`` of a run config (``cache`` where the config predates them)."""
    data = config["data"]
    return {side: data.get(f"{side}_source", "cache") for side in MODALITIES}
