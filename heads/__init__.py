"""Stage two: retrieval heads trained from cached features.

* ``heads.models``: the heads, one module each (importing this package registers them all);
* ``heads.layers``: the building blocks they share;
* ``heads.eval``: scoring, metrics, two-stage re-ranking and split evaluation;
* ``heads.base`` (the Head interface), ``heads.registry``, ``heads.config``, ``heads.losses``,
  ``heads.train``, ``heads.checkpoint``, ``heads.distributed``: the training app;
  ``heads.commands``: the click commands.
"""
from heads.registry import build_head, head_class, head_options, list_heads, register_head
from heads import models  # noqa: E402,F401  (registers every head)

__all__ = ["register_head", "build_head", "list_heads", "head_class", "head_options"]
