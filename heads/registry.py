"""The head registry: ``register_head`` (class decorator), ``build_head``, ``list_heads``.

A head registers itself when its module is imported; ``heads/models/__init__.py`` imports every
head module, and importing the ``heads`` package imports ``heads.models``, so a new head is one
file in ``heads/models/`` plus one import line there.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, TypeVar

from cache.errors import InputError
from heads.base import FeatureSpec, Head

_REGISTRY: dict[str, type[Head]] = {}

H = TypeVar("H", bound=type[Head])


def register_head(name: str) -> Callable[[H], H]:
    """Class decorator: make a Head subclass buildable as ``name``."""

    def decorator(cls: H) -> H:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"head {name!r} registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def list_heads() -> list[str]:
    """Names of all registered heads."""
    return sorted(_REGISTRY)


def head_class(name: str) -> type[Head]:
    """The class registered under ``name`` (InputError listing the known heads otherwise)."""
    if name not in _REGISTRY:
        raise InputError(f"unknown head {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def head_options(name: str) -> dict[str, Any]:
    """The options a head accepts, with their defaults."""
    params = inspect.signature(head_class(name).__init__).parameters
    return {p.name: p.default for p in params.values()
            if p.name not in ("self", "image_spec", "text_spec")
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def build_head(name: str, image_spec: FeatureSpec, text_spec: FeatureSpec, **options: Any) -> Head:
    """Instantiate head ``name`` for the given caches; unknown options are an InputError."""
    cls = head_class(name)
    unknown = sorted(set(options) - set(head_options(name)))
    if unknown:
        raise InputError(f"head {name!r} has no option(s) {unknown}; it accepts "
                         f"{sorted(head_options(name))}")
    return cls(image_spec, text_spec, **options)
