"""Token sources: what each side of a head reads, and the model that puts them in front of the head.

``data.image_source`` / ``data.text_source`` choose, per side:

* ``cache`` (default): the cached tokens as they are (`CachedTokens`, no weights);
* ``tail``: the tokens of a cache written at an intermediate layer K, run through the backbone's
  blocks after K and its final norm (`TailTokens` over `extract.tails.tail_from_cache`), which are
  trained with the head; the frozen lower blocks never run;
* ``e2e``: the photos / captions themselves through the whole backbone (`BackboneTokens`), trained
  with the head, with the references' augmentations (`heads.raw_inputs`). The split's caches
  still say what to read (photo files, caption word pieces) and which backbone (its weights are
  loaded again and checked by hash); their tokens are not read.

Each source also says how a split's rows reach it (`TokenSource.batches` for encoding,
`TokenSource.training_reader` for training): cached tokens for ``cache`` and ``tail``, decoded
photos or word-piece ids for ``e2e``. `SourceOptions` carries the config keys sources read.
A train image cache of several views per photo (``cli extract --views N``) gives ``cache`` and
``tail`` another view of each photo each epoch (`cache.datasets.view_of`); encoding reads the
centre view.

`RetrievalModel` holds ``head``, ``image_source`` and ``text_source``: the trainer, the loss module
(`heads.distributed.LossModule`, which runs the sources before any all-gather), the scorer
(`heads.eval`) and checkpoints all take it. It offers the head's scoring interface (encode through
the source, then the head; ``score``, modes), so evaluation code takes a model or a bare head.
Checkpoints keep the head's state under ``model`` as before and each tuned source's state under
``sources`` (`RetrievalModel.tuned_states`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from cache.batch import IdsBatch, InputBatch, PixelBatch, TokenBatch
from cache.datasets import token_batches
from cache.errors import InputError
from cache.store import ImageCache, TextCache
from heads.base import Encoded, FeatureSpec, Head

SIDES = ("image", "text")


@dataclass(frozen=True)
class SourceOptions:
    """What token sources read from a run config (``data`` and ``run`` keys)."""

    images_root: str | None = None              # data.images_root: e2e photos (None: recorded)
    crop_scale: tuple[float, float] = (0.6, 1.0)  # data.crop_scale: e2e RandomResizedCrop
    text_augment: float = 0.2                   # data.text_augment: e2e word perturbation
    workers: int = 0                            # data.num_workers: e2e photo decoding
    grad_checkpointing: bool = False            # run.grad_checkpointing: tuned blocks

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> SourceOptions:
        data = config["data"]
        return cls(images_root=data.get("images_root"),
                   crop_scale=tuple(data.get("crop_scale", cls.crop_scale)),
                   text_augment=data.get("text_augment", cls.text_augment),
                   workers=data.get("num_workers", 0),
                   grad_checkpointing=config.get("run", {}).get("grad_checkpointing", False))


class TokenSource(nn.Module):
    """Turns what a side reads (cached tokens, or photos / captions) into the token batch its
    head reads."""

    tuned: ClassVar[bool] = False     # has weights that train with the head (saved in checkpoints)

    def forward(self, batch: InputBatch) -> TokenBatch:
        raise NotImplementedError

    @property
    def reads(self) -> str:
        """What ``forward`` takes: "tokens" (a backbone's states at the cache's layer, as a
        `TokenBatch`), "pixels" (`PixelBatch`) or "ids" (`IdsBatch`)."""
        return "tokens"

    def output_spec(self, cached: FeatureSpec) -> FeatureSpec:
        """What the head receives, given the spec of the cache this source reads."""
        return cached

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

    def set_grad_checkpointing(self, enabled: bool) -> None:
        """Recompute the tuned blocks' activations in the backward pass (less memory)."""


class CachedTokens(TokenSource):
    """The cached tokens themselves."""

    def forward(self, batch: TokenBatch) -> TokenBatch:
        return batch


class TailTokens(TokenSource):
    """Layer-K cached tokens through the backbone's ``tail`` (an `extract.tails` tail: transformer
    blocks ``tail.blocks.<i>.*`` for backbone block i and ``tail.norm.*``, or a CNN's stages after
    K). A transformer tail keeps the token positions, and padding positions of its output are zero
    as the cached batches' are; a CNN tail (``tail.layout``) turns the layer-K grid into the last
    layer's tokens, every one of them valid (image caches have no padding)."""

    tuned = True

    def __init__(self, tail: nn.Module) -> None:
        super().__init__()
        self.tail = tail

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
        self.tail.checkpointing = enabled


class BackboneTokens(TokenSource):
    """The whole backbone (an `extract.encoders` encoder at its last layer) on photos
    (`PixelBatch`) or word-piece ids (`IdsBatch`); its BatchNorm layers stay in eval mode (frozen
    statistics, trained affine weights, as the references tune CNNs). On CUDA, photos and the
    backbone's convolutions run channels-last."""

    tuned = True

    def __init__(self, encoder: nn.Module, options: SourceOptions = SourceOptions()) -> None:
        super().__init__()
        self.encoder = encoder
        self.options = options
        self.modality = "image" if hasattr(encoder, "layout") else "text"
        self._channels_last = False

    @property
    def reads(self) -> str:
        return "pixels" if self.modality == "image" else "ids"

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

    def train(self, mode: bool = True) -> BackboneTokens:
        from extract.tails import freeze_batchnorm

        super().train(mode)
        freeze_batchnorm(self)
        return self

    def _photos(self, cache: ImageCache, training: bool) -> Any:
        from extract.transforms import training_transform
        from heads.raw_inputs import PhotoFiles, images_root

        transform = self.encoder.transform
        if training:
            transform = training_transform(transform, self.options.crop_scale)
        return PhotoFiles(cache, images_root(cache, self.options.images_root), transform)

    def _captions(self, cache: TextCache, seed: int, training: bool) -> Any:
        from heads.raw_inputs import CaptionIds, WordPieceAugment

        tokenizer = self.encoder.tokenizer
        augment = (WordPieceAugment.for_tokenizer(tokenizer, self.options.text_augment)
                   if training and self.options.text_augment > 0 else None)
        return CaptionIds(cache, augment, seed, pad_id=tokenizer.pad_token_id or 0)

    def batches(self, cache: ImageCache | TextCache, batch_size: int,
                rows: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, InputBatch]]:
        from heads.raw_inputs import id_batches, photo_batches

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
        model = self.encoder.model
        if hasattr(model, "set_grad_checkpointing"):                     # timm
            model.set_grad_checkpointing(enabled)
        elif enabled:                                                     # transformers
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()


def _tail(cache: ImageCache | TextCache, options: SourceOptions) -> TokenSource:
    from extract.tails import tail_from_cache

    return TailTokens(tail_from_cache(cache))


def _backbone(cache: ImageCache | TextCache, options: SourceOptions) -> TokenSource:
    from extract.recorded import recorded_encoder

    encoder = recorded_encoder(cache.attrs.modality, cache.attrs, str(cache.path), layer=-1)
    return BackboneTokens(encoder.train().requires_grad_(True), options)


_BUILDERS: dict[str, Callable[[ImageCache | TextCache, SourceOptions], TokenSource]] = {
    "cache": lambda cache, options: CachedTokens(),
    "tail": _tail,
    "e2e": _backbone,
}
SOURCE_KINDS = tuple(_BUILDERS)


def build_source(kind: str, cache: ImageCache | TextCache,
                 options: SourceOptions = SourceOptions()) -> TokenSource:
    """The ``kind`` source of one side, for the backbone that wrote ``cache`` (its train split)."""
    if kind not in _BUILDERS:
        raise InputError(f"unknown token source {kind!r}; known: {', '.join(SOURCE_KINDS)}")
    source = _BUILDERS[kind](cache, options)
    if options.grad_checkpointing:
        source.set_grad_checkpointing(True)
    return source


class RetrievalModel(nn.Module):
    """A head behind one token source per side (see the module docstring)."""

    def __init__(self, head: Head, image_source: TokenSource | None = None,
                 text_source: TokenSource | None = None) -> None:
        super().__init__()
        self.head = head
        self.image_source = image_source if image_source is not None else CachedTokens()
        self.text_source = text_source if text_source is not None else CachedTokens()

    def sources(self) -> dict[str, TokenSource]:
        return {"image": self.image_source, "text": self.text_source}

    def tuned_sides(self) -> list[str]:
        """The sides whose source trains with the head."""
        return [side for side, source in self.sources().items() if source.tuned]

    def named_trainable(self) -> list[tuple[str, nn.Parameter]]:
        """Trainable parameters as ``optim.lr_mult`` names them: the head's by their name in the
        head (as in checkpoints), the sources' as ``image_source.<name>`` /
        ``text_source.<name>``."""
        named = [(n, p) for n, p in self.head.named_parameters() if p.requires_grad]
        for side, source in self.sources().items():
            named += [(f"{side}_source.{n}", p) for n, p in source.named_parameters()
                      if p.requires_grad]
        return named

    def tuned_states(self) -> dict[str, dict[str, Tensor]]:
        """``{side: state dict}`` of the tuned sources (empty for cache sources only)."""
        return {side: self.sources()[side].state_dict() for side in self.tuned_sides()}

    def load_tuned_states(self, states: dict[str, dict[str, Tensor]], where: str) -> None:
        """Load what `tuned_states` saved (InputError naming ``where`` when it does not fit)."""
        if set(states) != set(self.tuned_sides()):
            raise InputError(f"{where}: holds tuned source weights of {sorted(states) or 'no side'}"
                             f", this model tunes {self.tuned_sides() or 'no side'} (changed "
                             "data.image_source / data.text_source?)")
        for side, state in states.items():
            try:
                self.sources()[side].load_state_dict(state)
            except RuntimeError as exc:
                raise InputError(f"{where}: the tuned {side} source does not fit the backbone of "
                                 f"the caches ({str(exc).splitlines()[0]})") from exc

    # ------------------------------------------------------------- the head's scoring interface

    def encode_images(self, batch: InputBatch) -> Encoded:
        return self.head.encode_images(self.image_source(batch))

    def encode_texts(self, batch: InputBatch) -> Encoded:
        return self.head.encode_texts(self.text_source(batch))

    def score(self, images: Encoded, texts: Encoded) -> Tensor:
        return self.head.score(images, texts)

    def score_pairs(self, images: Encoded, texts: Encoded) -> Tensor:
        return self.head.score_pairs(images, texts)

    def set_mode(self, mode: str | None) -> "RetrievalModel":
        self.head.set_mode(mode)
        return self

    @property
    def mode(self) -> str | None:
        return self.head.mode

    @mode.setter
    def mode(self, mode: str | None) -> None:
        self.head.mode = mode

    @property
    def score_kind(self) -> str:
        return self.head.score_kind

    @property
    def name(self) -> str:
        return self.head.name


def input_batches(model: Head | RetrievalModel, cache: ImageCache | TextCache, batch_size: int,
                  rows: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, InputBatch]]:
    """What a model (or bare head: the cached tokens) encodes of a split's rows, in order."""
    if isinstance(model, RetrievalModel):
        return model.sources()[cache.attrs.modality].batches(cache, batch_size, rows)
    return token_batches(cache, batch_size, rows)


Retriever = Head | RetrievalModel
"""What the scorer evaluates: a model, or a bare head (its sources: the cached tokens)."""
