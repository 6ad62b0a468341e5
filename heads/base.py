"""The head interface shared by every retrieval method, and the batch types it consumes.

Two kinds of head share one interface:

* embedding heads encode each image and caption to one vector; similarity is a matrix product;
* interaction heads encode each side to a token set once, then ``score`` blocks of pairs.

An encoding is a plain ``dict[str, Tensor]`` whose tensors all have the number of items as their
first dimension, so the evaluator can concatenate, slice and move encodings without knowing a head.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor, nn

from cache.batch import TokenBatch
from cache.errors import CacheMismatchError, InputError

Encoded = dict[str, Tensor]


@dataclass(frozen=True)
class FeatureSpec:
    """What one side's cache offers a head, read from the cache file's attributes."""

    modality: str
    dim: int
    encoder: str = ""
    num_tokens: int = 0
    prefix_tokens: int = 0
    suffix_tokens: int = 0
    grid: tuple[int, int] | None = None
    source: str = ""

    @classmethod
    def from_cache(cls, cache: Any) -> "FeatureSpec":
        """Build the spec of an ``ImageCache`` / ``TextCache`` reader."""
        a = cache.attrs
        return cls(modality=a.modality, dim=a.dim, encoder=a.encoder, num_tokens=a.num_tokens,
                   prefix_tokens=a.prefix_tokens, suffix_tokens=a.suffix_tokens,
                   grid=a.grid, source=str(cache.path))

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FeatureSpec":
        d = dict(d)
        if d.get("grid") is not None:
            d["grid"] = tuple(d["grid"])
        return cls(**d)


@dataclass(frozen=True)
class Progress:
    """Where training is: losses and heads use it for warm-ups and schedules."""

    epoch: int = 0
    step: int = 0                # global optimisation step
    steps_per_epoch: int = 1


Criterion = Callable[[Tensor, Tensor, Progress], Tensor]
"""A batch loss: ``criterion(scores [B_img, B_txt], image_ids [B], progress) -> scalar``."""


class Head(nn.Module):
    """Base of every head. Subclasses register with ``heads.register_head``."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""
    requires_grid: ClassVar[bool] = False
    modes: ClassVar[dict[str, str]] = {}
    """Named inference branches besides the default one, each mapped to its kind ("embedding" or
    "interaction"); e.g. a global/local head: ``{"global": "embedding", "local": "interaction"}``."""

    def __init__(self, image_spec: FeatureSpec, text_spec: FeatureSpec) -> None:
        super().__init__()
        self.check_inputs(image_spec, text_spec)
        self.image_spec, self.text_spec = image_spec, text_spec
        self.mode: str | None = None

    def set_mode(self, mode: str | None) -> "Head":
        """Select the inference branch that ``score``/``score_pairs`` use (None = default)."""
        if mode is not None and mode not in self.modes:
            raise InputError(f"head {self.name!r} has no inference mode {mode!r}; modes: "
                             f"{sorted(self.modes) or 'none'}")
        self.mode = mode
        return self

    @property
    def score_kind(self) -> str:
        """Kind of the active branch: "embedding" (matrix product) or "interaction" (blockwise)."""
        return self.modes[self.mode] if self.mode is not None else self.kind

    @classmethod
    def check_inputs(cls, image_spec: FeatureSpec, text_spec: FeatureSpec) -> None:
        """Fail with a message naming the cache file when the caches cannot feed this head."""
        if image_spec.modality != "image":
            raise CacheMismatchError(f"{image_spec.source}: head {cls.name!r} needs an image cache "
                                     f"here, got a {image_spec.modality} cache")
        if text_spec.modality != "text":
            raise CacheMismatchError(f"{text_spec.source}: head {cls.name!r} needs a text cache "
                                     f"here, got a {text_spec.modality} cache")
        if cls.requires_grid and image_spec.grid is None:
            raise CacheMismatchError(f"{image_spec.source}: head {cls.name!r} needs patch tokens on "
                                     f"a grid, but encoder {image_spec.encoder!r} has no grid "
                                     "(region features?)")

    def pretrained_parts(self) -> dict[str, str]:
        """Submodules this head takes, already trained, from another run: ``{submodule name:
        checkpoint path}`` (e.g. a distilled teacher). A head never reads files: the trainer loads
        them (``heads.checkpoint.load_pretrained_parts``) and calls ``part_loaded``."""
        return {}

    def part_loaded(self, name: str) -> None:
        """Called after the weights of ``pretrained_parts()[name]`` were copied into the head."""

    def frozen_prefixes(self) -> tuple[str, ...]:
        """Parameter-name prefixes that receive no gradient by design (e.g. ``"teacher."``)."""
        return ()

    def trained_branches(self) -> list[str | None]:
        """The inference branches this head's training fits: every named mode, or the default
        branch (None). A head that trains only some of its branches in a stage says which."""
        return list(self.modes) or [None]

    def encode_images(self, batch: TokenBatch) -> Encoded:
        raise NotImplementedError

    def encode_texts(self, batch: TokenBatch) -> Encoded:
        raise NotImplementedError

    def score(self, images: Encoded, texts: Encoded) -> Tensor:
        """Similarities ``[n_img, n_txt]`` of every image against every caption of two blocks."""
        raise NotImplementedError

    def score_pairs(self, images: Encoded, texts: Encoded) -> Tensor:
        """Similarities ``[P]`` of aligned pairs: row p of ``images`` with row p of ``texts``."""
        raise NotImplementedError

    def training_loss(self, images: TokenBatch, texts: TokenBatch, image_ids: Tensor,
                      criterion: Criterion, progress: Progress) -> tuple[Tensor, dict[str, float]]:
        """The training objective of one batch of (image, caption) pairs; row i pairs with row i.

        ``image_ids`` identifies the image of each pair so that another caption of the same image
        is not treated as a negative. Returns the loss and scalars to log.
        """
        scores = self.score(self.encode_images(images), self.encode_texts(texts))
        loss = criterion(scores, image_ids, progress)
        return loss, {"loss": float(loss.detach())}


class EmbeddingHead(Head):
    """A head whose encodings are single L2-normalised vectors under the key ``"emb"``."""

    kind = "embedding"

    def score(self, images: Encoded, texts: Encoded) -> Tensor:
        return images["emb"] @ texts["emb"].transpose(0, 1)

    def score_pairs(self, images: Encoded, texts: Encoded) -> Tensor:
        return (images["emb"] * texts["emb"]).sum(dim=-1)


class InteractionHead(Head):
    """A head that scores pairs of token sets. ``score`` defaults to all pairs via ``score_pairs``;
    subclasses override it with a vectorised block computation where one exists."""

    kind = "interaction"

    def score(self, images: Encoded, texts: Encoded) -> Tensor:
        n_img, n_txt = num_items(images), num_items(texts)
        img_rows = torch.arange(n_img, device=_device(images)).repeat_interleave(n_txt)
        txt_rows = torch.arange(n_txt, device=_device(texts)).repeat(n_img)
        pairs = self.score_pairs(index_encoded(images, img_rows), index_encoded(texts, txt_rows))
        return pairs.view(n_img, n_txt)


# ----------------------------------------------------------------------------- encoding utilities


def _device(enc: Encoded) -> torch.device:
    return next(iter(enc.values())).device


def num_items(enc: Encoded) -> int:
    """Number of items (rows) in an encoding."""
    return next(iter(enc.values())).shape[0]


def index_encoded(enc: Encoded, rows: Tensor | slice) -> Encoded:
    """Select rows of every tensor of an encoding."""
    return {k: v[rows] for k, v in enc.items()}


def map_encoded(enc: Encoded, fn: Callable[[Tensor], Tensor]) -> Encoded:
    """Apply ``fn`` to every tensor (device moves, dtype casts)."""
    return {k: fn(v) for k, v in enc.items()}


def cat_encoded(parts: list[Encoded]) -> Encoded:
    """Concatenate encodings along the item dimension, zero-padding dimension 1 where lengths
    differ (token sets of different batches; masks pad with False)."""
    if not parts:
        raise ValueError("nothing to concatenate")
    out: Encoded = {}
    for key in parts[0]:
        tensors = [p[key] for p in parts]
        if tensors[0].dim() >= 2 and len({t.shape[1] for t in tensors}) > 1:
            width = max(t.shape[1] for t in tensors)
            tensors = [nn.functional.pad(t, [0, 0] * (t.dim() - 2) + [0, width - t.shape[1]])
                       for t in tensors]
        out[key] = torch.cat(tensors, dim=0)
    return out
