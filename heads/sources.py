"""Token sources: what each side of a head reads, and the model that puts them in front of the head.

``data.image_source`` / ``data.text_source`` choose, per side:

* ``cache`` (default): the cached tokens as they are (`CachedTokens`, no weights);
* ``tail``: the tokens of a cache written at an intermediate layer K, run through the backbone's
  blocks after K and its final norm (`TailTokens` over `extract.tails.tail_from_cache`), which are
  trained with the head; the frozen lower blocks never run.

`RetrievalModel` holds ``head``, ``image_source`` and ``text_source``: the trainer, the loss module
(`heads.distributed.LossModule`, which runs the sources before any all-gather), the scorer
(`heads.eval`) and checkpoints all take it. It offers the head's scoring interface (encode through
the source, then the head; ``score``, modes), so evaluation code takes a model or a bare head.
Checkpoints keep the head's state under ``model`` as before and each tuned source's state under
``sources`` (`RetrievalModel.tuned_states`).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, ClassVar

import torch
from torch import Tensor, nn

from cache.batch import TokenBatch
from cache.errors import InputError
from cache.store import ImageCache, TextCache
from heads.base import Encoded, FeatureSpec, Head

SIDES = ("image", "text")


class TokenSource(nn.Module):
    """Turns a side's cached token batch into the token batch its head reads."""

    tuned: ClassVar[bool] = False     # has weights that train with the head (saved in checkpoints)

    def forward(self, batch: TokenBatch) -> TokenBatch:
        raise NotImplementedError

    def output_spec(self, cached: FeatureSpec) -> FeatureSpec:
        """What the head receives, given the spec of the cache this source reads."""
        return cached


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


def _tail(cache: ImageCache | TextCache) -> TokenSource:
    from extract.tails import tail_from_cache

    return TailTokens(tail_from_cache(cache))


_BUILDERS: dict[str, Callable[[ImageCache | TextCache], TokenSource]] = {
    "cache": lambda cache: CachedTokens(),
    "tail": _tail,
}
SOURCE_KINDS = tuple(_BUILDERS)


def build_source(kind: str, cache: ImageCache | TextCache) -> TokenSource:
    """The ``kind`` source of one side, for the backbone that wrote ``cache`` (its train split)."""
    if kind not in _BUILDERS:
        raise InputError(f"unknown token source {kind!r}; known: {', '.join(SOURCE_KINDS)}")
    return _BUILDERS[kind](cache)


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

    def encode_images(self, batch: TokenBatch) -> Encoded:
        return self.head.encode_images(self.image_source(batch))

    def encode_texts(self, batch: TokenBatch) -> Encoded:
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


Retriever = Head | RetrievalModel
"""What the scorer evaluates: a model, or a bare head (its sources: the cached tokens)."""
