"""Checkpoints: atomic saves, validated loads, the feature identities a run is checked against
(`heads.model.create_model` builds a checkpoint's model; `train.trainer` writes and resumes runs).

A checkpoint is a dict saved with ``torch.save`` holding only tensors, numbers, strings, lists and
dicts (it loads with ``weights_only=True``): the head (name, options, state), its FeatureSpecs and
the identity of the caches it was trained on, the loss, optimiser and schedule states, the RNG
states of every rank, the position (epoch, step), the best dev score and the resolved config.

Format 2 adds ``sources``: ``{side: state dict}`` of each tuned token source (``heads.sources``;
empty when both sides read the cache), beside the head's state under ``model`` (its names
unchanged). The kind of each side's source is the config's ``data.<side>_source``
(`heads.sources.source_kinds`). Format 1 files
(written before token sources existed: every side reads the cache) load as they are.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from cache.errors import CacheMismatchError, InputError
from cache.store import CacheAttrs
from heads.base import Head

FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
REQUIRED = ("format", "head_name", "head_options", "image_spec", "text_spec", "features", "model",
            "config", "epoch", "step")


def feature_identity(cache: Any) -> dict[str, Any]:
    """The ``CacheAttrs.FEATURE_FIELDS`` of a cache reader, as plain values."""
    out = {}
    for name in CacheAttrs.FEATURE_FIELDS:
        value = getattr(cache.attrs, name)
        out[name] = list(value) if isinstance(value, tuple) else value
    return out


def check_features(expected: dict[str, Any], cache: Any, reference: str) -> None:
    """Raise CacheMismatchError naming ``cache.path`` when its features differ from ``expected``
    (the identity of the caches described by ``reference``, e.g. a checkpoint or a train cache)."""
    actual = feature_identity(cache)
    diff = [f"{k} is {actual[k]!r}, expected {expected[k]!r}" for k in CacheAttrs.FEATURE_FIELDS
            if k in expected and actual[k] != expected[k]]
    if diff:
        raise CacheMismatchError(f"{cache.path}: features differ from {reference} "
                                 f"({'; '.join(diff)})")


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` to ``path`` atomically (a temporary file in the same folder, then rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and sanity-check a checkpoint; a missing or foreign file is an InputError."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch.load raises many kinds on a foreign file  # noqa: BLE001
        raise InputError(f"{path}: not a readable checkpoint ({str(exc).splitlines()[0]})") from exc
    missing = [k for k in REQUIRED if not isinstance(state, dict) or k not in state]
    if missing:
        raise InputError(f"{path}: not a checkpoint of this toolkit (missing {missing})")
    if state["format"] not in READABLE_FORMATS:
        raise InputError(f"{path}: checkpoint format {state['format']}, this tool reads "
                         f"{', '.join(map(str, READABLE_FORMATS))}")
    state["path"] = str(path)
    return state


def note_centre_view(state: dict[str, Any], reader: str) -> None:
    """Say on stderr that ``reader`` (``cli index``, ``cli explain``) encodes one view per photo,
    the centre view, where the run of ``state`` trained on several (``image_views``)."""
    views = int(state.get("image_views", 1))
    if views > 1:
        tqdm.write(f"note: {state['path']} was trained on {views} views per photo; {reader} "
                   "encodes each photo once, as the centre view (the extraction's preprocessing)",
                   file=sys.stderr)


def load_pretrained_parts(head: Head) -> list[str]:
    """Copy into ``head`` the submodules it takes from other runs (``head.pretrained_parts()``):
    for each ``{name: path}``, only the weights under ``name.`` of that checkpoint, which must be
    a run of the same head whose part has the same shapes. Returns the names loaded."""
    loaded = []
    for name, path in head.pretrained_parts().items():
        state = load_checkpoint(path)
        if state["head_name"] != head.name:
            raise InputError(f"{path}: a checkpoint of head {state['head_name']!r}; the {name} "
                             f"of head {head.name!r} must come from a run of head {head.name!r}")
        part = {k[len(name) + 1:]: v for k, v in state["model"].items()
                if k.startswith(f"{name}.")}
        own = head.get_submodule(name).state_dict()
        problems = [f"missing {k}" for k in sorted(set(own) - set(part))]
        problems += [f"unexpected {k}" for k in sorted(set(part) - set(own))]
        problems += [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)} here"
                     for k, v in part.items() if k in own and v.shape != own[k].shape]
        if problems:
            raise InputError(f"{path}: its {name} does not fit this head (check the head options "
                             f"and the caches): {'; '.join(problems[:4])}")
        head.get_submodule(name).load_state_dict(part)
        head.part_loaded(name)
        loaded.append(name)
    return loaded
