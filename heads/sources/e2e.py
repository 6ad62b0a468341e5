"""``e2e``: the photos / captions themselves through the whole backbone, trained with the head,
with the references' augmentations (`heads.raw_inputs`). The split's caches still say what to
read (photo files, caption word pieces) and which backbone (its weights are loaded again and
checked by hash); their tokens are not read."""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import torch
from torch import nn

from backbones.encoders import group_depths
from backbones.transforms import training_transform
from cache.batch import IdsBatch, InputBatch, PixelBatch, TokenBatch
from cache.errors import InputError
from cache.store import ImageCache, TextCache
from heads.base import FeatureSpec
from heads.raw_inputs import (CaptionIds, PhotoFiles, WordPieceAugment, id_batches, images_root,
                              photo_batches)
from heads.sources.registry import SourceOptions, TokenSource, register_source

if TYPE_CHECKING:
    from heads.sources.registry import Encoder


@register_source("e2e")
class BackboneTokens(TokenSource):
    """The whole backbone (an `backbones.encoders` encoder at its last layer) on photos
    (`PixelBatch`) or word-piece ids (`IdsBatch`); its BatchNorm layers stay in eval mode (frozen
    statistics, trained affine weights, as the references tune CNNs). On CUDA, photos and the
    backbone's convolutions run channels-last. With an e2e image side an epoch visits each photo
    once (``epoch_unit``)."""

    tuned = True
    token_drop = False
    export_note = "whole backbone (e2e)"

    def __init__(self, encoder: nn.Module, options: SourceOptions = SourceOptions()) -> None:
        super().__init__()
        self.encoder = encoder
        self.options = options
        self.modality = "image" if hasattr(encoder, "layout") else "text"
        self._channels_last = False

    @classmethod
    def from_cache(cls, cache: ImageCache | TextCache, options: SourceOptions) -> BackboneTokens:
        from backbones.recorded import recorded_encoder

        encoder = recorded_encoder(cache.attrs.modality, cache.attrs, str(cache.path), layer=-1)
        source = cls(encoder.train().requires_grad_(True), options)
        if options.grad_checkpointing:
            source.set_grad_checkpointing(True)
        return source

    @classmethod
    def for_export(cls, encoder: Encoder, where: str) -> BackboneTokens:
        return cls(encoder)

    @property
    def reads(self) -> str:
        return "pixels" if self.modality == "image" else "ids"

    @property
    def epoch_unit(self) -> str:
        return "images" if self.modality == "image" else "captions"

    def forward(self, batch: InputBatch) -> TokenBatch:
        if isinstance(batch, PixelBatch):
            pixels = batch.pixels
            if pixels.is_cuda:
                if not self._channels_last:
                    self.encoder.to(memory_format=torch.channels_last)
                    self._channels_last = True
                pixels = pixels.contiguous(memory_format=torch.channels_last)
            tokens = self.encoder(pixels)
            return TokenBatch(tokens, torch.ones(tokens.shape[:2], dtype=torch.bool,
                                                 device=tokens.device))
        if not isinstance(batch, IdsBatch):
            raise TypeError(f"an e2e {self.modality} source reads photos or word-piece ids, "
                            f"got {type(batch).__name__}")
        states = self.encoder(batch.input_ids, batch.mask.long())
        return TokenBatch(states * batch.mask.unsqueeze(-1).to(states.dtype), batch.mask)

    def output_spec(self, cached: FeatureSpec) -> FeatureSpec:
        if self.modality == "text":
            return dataclasses.replace(cached, dim=self.encoder.dim)
        layout = self.encoder.layout
        return dataclasses.replace(cached, dim=layout.dim, num_tokens=layout.num_tokens,
                                   prefix_tokens=layout.prefix_tokens, grid=layout.grid)

    def encode_raw(self, raw: PixelBatch | IdsBatch, encoder: Encoder) -> InputBatch:
        """The photo or caption itself: the tuned backbone reads it."""
        return raw

    def layer_depths(self, names: list[str]) -> dict[str, int]:
        inner = [n.removeprefix("encoder.model.") for n in names]
        depths = group_depths(self.encoder.group_matcher(), inner)
        return {name: depths[n] for name, n in zip(names, inner)}

    def train(self, mode: bool = True) -> BackboneTokens:
        from backbones.tails import freeze_batchnorm

        super().train(mode)
        freeze_batchnorm(self)
        return self

    def _photos(self, cache: ImageCache, training: bool) -> PhotoFiles:
        transform = self.encoder.transform
        if training:
            transform = training_transform(transform, self.options.crop_scale)
        return PhotoFiles(cache, images_root(cache, self.options.images_root), transform)

    def _captions(self, cache: TextCache, seed: int, training: bool) -> CaptionIds:
        tokenizer = self.encoder.tokenizer
        augment = (WordPieceAugment.for_tokenizer(tokenizer, self.options.text_augment)
                   if training and self.options.text_augment > 0 else None)
        return CaptionIds(cache, augment, seed, pad_id=tokenizer.pad_token_id or 0)

    def batches(self, cache: ImageCache | TextCache, batch_size: int,
                rows: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, InputBatch]]:
        rows = np.arange(len(cache)) if rows is None else np.asarray(rows, np.int64)
        if self.modality == "image":
            photos = self._photos(cache, training=False)
            photos.check()
            return photo_batches(photos, rows, batch_size, self.options.workers)
        return id_batches(self._captions(cache, 0, training=False), rows, batch_size)

    def training_reader(self, cache: ImageCache | TextCache, seed: int) -> Any:
        if self.modality == "image":
            return self._photos(cache, training=True)
        return self._captions(cache, seed, training=True)

    def check_inputs(self, cache: ImageCache | TextCache) -> None:
        if self.modality == "image":
            self._photos(cache, training=False).check()
        elif cache.attrs.num_tokens > self.encoder.max_length:
            raise InputError(f"{cache.path}: captions of up to {cache.attrs.num_tokens} word "
                             f"pieces, the e2e text backbone takes {self.encoder.max_length}")

    def set_grad_checkpointing(self, enabled: bool) -> None:
        """Recompute the backbone's activations in the backward pass (less memory)."""
        model = self.encoder.model
        if hasattr(model, "set_grad_checkpointing"):                     # timm
            model.set_grad_checkpointing(enabled)
        elif enabled:                                                     # transformers
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
