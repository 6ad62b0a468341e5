"""``init.checkpoint``: a new run's head initialised from the weights of another run."""
from __future__ import annotations

from typing import Any

from cache.errors import InputError
from heads.base import Head
from train.config import longest_prefix


def _renamed(name: str, rename: dict[str, str]) -> str:
    """``name`` with its longest matching source prefix replaced (``image_fc`` -> ``vision_proj``)."""
    prefix = longest_prefix(name, rename)
    return name if prefix is None else rename[prefix] + name[len(prefix.rstrip(".")):]


def warm_start(head: Head, state: dict[str, Any], rename: dict[str, str]) -> list[str]:
    """Initialise ``head`` from the weights of another run's checkpoint; returns the loaded names.

    Source names are renamed by prefix (``rename``); every tensor whose new name exists in ``head``
    is loaded and must have the same shape, every prefix in ``rename`` must name source weights,
    and at least one tensor must load. The caches are checked by the caller."""
    source = state.get("path", "checkpoint")
    for prefix in rename:
        if not any(longest_prefix(name, [prefix]) for name in state["model"]):
            raise InputError(f"{source}: init.rename names {prefix!r}, but head "
                             f"{state['head_name']!r} has no such weights "
                             f"({', '.join(sorted(state['model'])[:8])})")
    own = head.state_dict()
    loaded = {}
    for name, tensor in state["model"].items():
        target = _renamed(name, rename)
        if target not in own:
            continue
        if own[target].shape != tensor.shape:
            raise InputError(f"{source}: weight {name!r} has shape {tuple(tensor.shape)} but "
                             f"{target!r} of head {head.name!r} has {tuple(own[target].shape)} "
                             "(another embed_dim or cache?)")
        loaded[target] = tensor
    if not loaded:
        raise InputError(f"{source}: no weight of head {state['head_name']!r} matches a weight of "
                         f"head {head.name!r}; map names with init.rename")
    head.load_state_dict(loaded, strict=False)
    return sorted(loaded)
