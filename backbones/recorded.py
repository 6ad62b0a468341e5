"""Backbones built again from what a cache or a checkpoint recorded about them.

A feature cache (`cache.store.CacheAttrs`) and a checkpoint (``state["features"][side]``) both
record the backbone behind some tokens: encoder name, weights id and hash, layer, resolution and
preprocessing. Tails, e2e sources, ``cli explain`` and ``cli index`` load that backbone again;
`recorded_encoder` is the one way they do it, and it refuses weights that no longer hash the same.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from backbones.encoders import ImageEncoder, TextEncoder
from cache.errors import InputError
from cache.store import CacheAttrs

Encoder = ImageEncoder | TextEncoder


def recorded_encoder(modality: str, recorded: Mapping[str, Any] | CacheAttrs, where: str,
                     layer: int | None = None) -> Encoder:
    """The ``modality`` backbone that ``recorded`` names (``encoder``, ``weights_id``,
    ``weights_hash``, ``layer``, ``resolution``; text: ``preprocessing.max_length`` or
    ``num_tokens``), returning ``layer`` (default: the recorded one). InputError naming ``where``
    when it cannot be built or its weights no longer hash to ``weights_hash``."""
    from backbones.registry import create_image_encoder, create_text_encoder

    if isinstance(recorded, CacheAttrs):
        recorded = dataclasses.asdict(recorded)
    name, weights = recorded["encoder"], recorded["weights_id"]
    layer = recorded["layer"] if layer is None else layer
    try:
        if modality == "image":
            encoder: Encoder = create_image_encoder(name, weights, layer, recorded["resolution"])
        else:
            max_length = (recorded.get("preprocessing") or {}).get("max_length") \
                or recorded.get("num_tokens") or 128
            encoder = create_text_encoder(name, weights, layer, int(max_length))
    except InputError as err:
        raise InputError(f"{where}: cannot load the backbone ({modality}: {err})") from err
    except Exception as err:  # noqa: BLE001 - transformers / timm raise many kinds on bad weights
        raise InputError(f"{where}: cannot load the backbone ({modality}: {name}, weights "
                         f"{weights}: {str(err).splitlines()[0]})") from err
    if encoder.weights_hash != recorded["weights_hash"]:
        raise InputError(f"{where}: the {modality} weights {weights} hash to "
                         f"{encoder.weights_hash}, but the tokens were made with weights "
                         f"{recorded['weights_hash']}; they changed since extraction (restore "
                         "them or extract again)")
    return encoder
