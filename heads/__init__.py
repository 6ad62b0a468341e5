"""The heads library: retrieval heads over token sources, and what scores them.

* ``heads.models``: the heads, one module each (importing this package registers them all);
* ``heads.layers``: the building blocks they share;
* ``heads.sources``: the token sources of a side, one registered plugin per kind;
* ``heads.eval``: scoring, metrics and two-stage re-ranking;
* ``heads.base`` (the Head interface), ``heads.registry``, ``heads.losses``, ``heads.model``
  (`create_model`), ``heads.checkpoint`` and ``heads.raw_inputs``.

The training app that trains and evaluates runs of these heads is the ``train`` package.
"""
from heads.registry import build_head, head_class, head_options, list_heads, register_head
from heads import models  # noqa: E402,F401  (registers every head)

__all__ = ["register_head", "build_head", "list_heads", "head_class", "head_options"]
