"""A trained run as a photo search engine: its backbones rebuilt from the checkpoint, its head behind
them, the branch that embeds (or, for re-ranking, the branch that interacts) selected.

A checkpoint records the features it was trained on (``state["features"][side]``: encoder, weights
id and hash, layer, resolution, preprocessing); `image_encoder` / `text_encoder` build those
backbones again and refuse weights that no longer hash the same. `load_model` rebuilds the head for
the index's image cache and a stand-in for the text side (a `RecordedCache`: the attributes a text cache of
the run's text encoder would have), so tail sources and spec checks work as in ``cli eval``.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from backbones.encoders import ImageEncoder, TextEncoder
from backbones.recorded import recorded_encoder
from cache.errors import InputError
from heads.model import RetrievalModel, create_model, recorded_cache
from heads.registry import head_class, list_heads


def _branches(head_name: str, kind: str) -> list[str | None]:
    """The inference modes of a head whose score is of ``kind`` (None: its default branch)."""
    cls = head_class(head_name)
    named = [mode for mode, mode_kind in cls.modes.items() if mode_kind == kind]
    default = [None] if cls.kind == kind and not cls.modes else []
    return named + default


def embedding_mode(state: dict[str, Any]) -> str | None:
    """The mode of a run's embedding branch; InputError for an interaction-only head."""
    modes = _branches(state["head_name"], "embedding")
    if not modes:
        usable = [name for name in list_heads() if _branches(name, "embedding")]
        raise InputError(f"{state['path']}: head {state['head_name']!r} has no embedding branch "
                         f"and cannot index photos; heads that can: {', '.join(usable)} (use this "
                         "run for re-ranking: cli search --rerank-topk K --fine-checkpoint "
                         "RUN/best.pt)")
    return modes[0]


def interaction_mode(state: dict[str, Any]) -> str | None:
    """The mode of a run's interaction branch (re-ranking); InputError for an embedding-only
    head."""
    modes = _branches(state["head_name"], "interaction")
    if not modes:
        raise InputError(f"{state['path']}: head {state['head_name']!r} has no interaction branch "
                         "to re-rank with (--fine-checkpoint takes e.g. a scan, laps, caa or tgdt "
                         "run)")
    return modes[0]


def checkpoint_sha256(path: str | Path) -> str:
    """The SHA-256 of a checkpoint file (an index remembers which run built it)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' loggers at "error" for the block (no weight-loading report on stderr: the
    CLI sets ``TRANSFORMERS_VERBOSITY``, the Python API gets the same quiet here)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def image_encoder(features: dict[str, Any], where: str) -> ImageEncoder:
    """The image backbone of recorded features (encoder, weights, layer, resolution)."""
    with quiet_transformers():
        return recorded_encoder("image", features, where)


def text_encoder(features: dict[str, Any], where: str) -> TextEncoder:
    """The text backbone of recorded features, with the tokenizer limit it was cached with."""
    with quiet_transformers():
        return recorded_encoder("text", features, where)


def load_model(state: dict[str, Any], image_cache: Any, mode: str | None) -> RetrievalModel:
    """The run's head behind its token sources for ``image_cache`` (checked against the run's
    image features), in eval mode with branch ``mode``."""
    text_cache = recorded_cache(state, "text",
                                Path(state["text_spec"].get("source") or state["path"]))
    with quiet_transformers():                     # an e2e run rebuilds its backbones
        model = create_model(state, image_cache, text_cache)
    return model.set_mode(mode).eval()
