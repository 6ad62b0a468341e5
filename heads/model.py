"""One model, built in one place: a head behind one token source per side.

`create_model` is how every part of the toolkit gets a model: the trainer from a resolved run
config (a new head, its tuned sources loaded from the caches' backbones), evaluation, search,
explain and the benchmarks from a checkpoint (the same, then the run's weights). It takes the
caches the model will read, or `RecordedCache` stand-ins (`recorded_cache`) where there are none
(one photo, a query): a source is built from the backbone its cache recorded
(`heads.sources.registry`), the head for the specs the sources hand it.

`RetrievalModel` holds ``head``, ``image_source`` and ``text_source``: the trainer, the loss module
(`train.distributed.LossModule`, which runs the sources before any all-gather), the scorer
(`heads.eval`) and checkpoints all take it. It offers the head's scoring interface (encode through
the source, then the head; ``score``, modes), so evaluation code takes a model or a bare head.
Checkpoints keep the head's state under ``model`` as before and each tuned source's state under
``sources`` (`RetrievalModel.tuned_states`).
"""
from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from cache.batch import InputBatch
from cache.datasets import token_batches
from cache.errors import InputError
from cache.store import CacheAttrs, ImageCache, TextCache
from heads.base import Encoded, FeatureSpec, Head
from heads.checkpoint import check_features
from heads.registry import build_head
from heads.sources.cache import CachedTokens
from heads.sources.registry import SourceOptions, TokenSource, build_source, source_kinds


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


Retriever = Head | RetrievalModel
"""What the scorer evaluates: a model, or a bare head (its sources: the cached tokens)."""


def input_batches(model: Retriever, cache: ImageCache | TextCache, batch_size: int,
                  rows: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, InputBatch]]:
    """What a model (or bare head: the cached tokens) encodes of a split's rows, in order."""
    if isinstance(model, RetrievalModel):
        return model.sources()[cache.attrs.modality].batches(cache, batch_size, rows)
    return token_batches(cache, batch_size, rows)


# ------------------------------------------------------------------------------------ building


@dataclass(frozen=True)
class RecordedCache:
    """What `create_model` needs of a cache, without rows: the attributes its backbone writes and
    a ``path`` naming what it stands for in messages (one photo, a query, an index)."""

    attrs: CacheAttrs
    path: str | Path


def recorded_cache(state: Mapping[str, Any], side: str, where: str | Path) -> RecordedCache:
    """The stand-in for a cache of ``side`` that a checkpoint's run read: the features it recorded
    (backbone, weights, layer, layout, preprocessing) and the token count of its spec (image
    side: the recorded grid's)."""
    features = state["features"][side]
    grid = features.get("grid")
    num_tokens = state[f"{side}_spec"].get("num_tokens", 0)
    if side == "image" and grid is not None:
        num_tokens = features["prefix_tokens"] + grid[0] * grid[1]
    attrs = CacheAttrs(
        modality=side, encoder=features["encoder"], weights_id=features["weights_id"],
        weights_hash=features["weights_hash"], dim=features["dim"], num_items=0,
        layer=features["layer"], num_tokens=num_tokens, prefix_tokens=features["prefix_tokens"],
        suffix_tokens=features["suffix_tokens"], grid=tuple(grid) if grid is not None else None,
        resolution=features.get("resolution"), preprocessing=features.get("preprocessing", {}))
    return RecordedCache(attrs, where)


def seed_everything(seed: int) -> None:
    """Seed torch, NumPy's global generator and ``random`` (a new head's initial weights)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def head_from_checkpoint(state: dict[str, Any], image_cache: Any = None,
                         text_cache: Any = None,
                         sources: dict[str, TokenSource] | None = None) -> Head:
    """Rebuild the head of a checkpoint and load its weights (on the CPU).

    With caches given, they are first checked against the caches the head was trained on, and the
    head is built for their specs (so a test cache with another token count still fits), as seen
    through the side's token source where ``sources`` (``{side: source}``) has one."""
    source = state.get("path", "checkpoint")
    caches = {"image": image_cache, "text": text_cache}
    for side, cache in caches.items():
        if cache is not None:
            check_features(state["features"][side], cache, f"the {side} cache of {source}")
    specs = []
    for side, cache in caches.items():
        if cache is None:
            specs.append(FeatureSpec.from_dict(state[f"{side}_spec"]))
            continue
        spec = FeatureSpec.from_cache(cache)
        specs.append(sources[side].output_spec(spec) if sources and side in sources else spec)
    head = build_head(state["head_name"], specs[0], specs[1], **state["head_options"])
    try:
        head.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise InputError(f"{source}: the weights do not fit head {state['head_name']!r} "
                         f"({str(exc).splitlines()[0]})") from exc
    return head


def create_model(run: Mapping[str, Any], image_cache: Any, text_cache: Any, *,
                 photos: str | Path | None = None, seed: int | None = None) -> RetrievalModel:
    """The model of ``run`` for ``image_cache`` / ``text_cache`` (readers or `RecordedCache`s),
    on the CPU.

    ``run`` is a resolved run config (``train.config``): a new head, seeded with ``seed`` after
    the sources are built (a tuned source loads its backbone first); or a checkpoint
    (``heads.checkpoint.load_checkpoint``): the caches are checked against the run's, and the
    head and the tuned sources get the run's weights; an e2e image side reads the photos from
    ``photos`` (default: the folder the image cache records). A source is built from the backbone
    of its cache (`heads.sources.build_source`), the head for the specs its sources hand it."""
    checkpoint = "head_name" in run
    config = run["config"] if checkpoint else run
    options = SourceOptions.from_config(config)
    if checkpoint:
        options = dataclasses.replace(options, images_root=None if photos is None else str(photos),
                                      grad_checkpointing=False)
    kinds = source_kinds(config)
    sources = {"image": build_source(kinds["image"], image_cache, options),
               "text": build_source(kinds["text"], text_cache, options)}
    if seed is not None:
        seed_everything(seed)
    if checkpoint:
        head = head_from_checkpoint(run, image_cache, text_cache, sources)
    else:
        specs = [sources["image"].output_spec(FeatureSpec.from_cache(image_cache)),
                 sources["text"].output_spec(FeatureSpec.from_cache(text_cache))]
        head = build_head(config["head"]["name"], *specs,
                          **{k: v for k, v in config["head"].items() if k != "name"})
    model = RetrievalModel(head, **{f"{side}_source": s for side, s in sources.items()})
    if checkpoint:
        model.load_tuned_states(run.get("sources", {}), run.get("path", "checkpoint"))
    return model
