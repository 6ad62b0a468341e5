"""Device names of every command (``--device``, ``run.device``), resolved in one place.

``auto`` is the local GPU when there is one, else the CPU; ``cuda`` without an index is the GPU of
this process under ``torchrun`` (``LOCAL_RANK`` modulo the visible GPUs).
"""
from __future__ import annotations

import os

import torch

from cache.errors import InputError


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` as a ``torch.device``; an unknown name or CUDA on
    a machine without it is an InputError. ``local_rank`` defaults to ``$LOCAL_RANK`` (0)."""
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and torch.cuda.is_available():
        name = f"cuda:{local_rank % torch.cuda.device_count()}"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name!r}: CUDA is not available on this machine")
    return device
