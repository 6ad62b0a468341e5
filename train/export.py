"""``cli export-backbone``: the backbone a tail or e2e run tuned, written as weights ``cli extract``
loads.

A run with ``data.<side>_source: tail`` keeps in its checkpoint only what it tuned: the blocks of
that side's backbone after the cache's layer K and the final norm (``sources[side]``, the state of
a `heads.sources.TailTokens`); an ``e2e`` run keeps the whole backbone (a
`heads.sources.BackboneTokens`). `export_backbone` rebuilds the whole backbone from the original
weights the run's cache names (its ``weights_id``; they must still hash to the run's
``weights_hash``), loads the tuned state into its tuned part, which is made of the backbone's own
modules (checked tensor by tensor), and writes the result in the form ``cli extract --weights``
loads for that backbone:

- transformers models (``bert``, ``minilm``, ``dinov2``, ``vit``): ``save_pretrained``, with the
  tokenizer for a text model; ``cli extract --text-encoder E --text-weights OUT`` or
  ``--backbone E --weights OUT``;
- timm models (``--backbone timm``): a timm model folder as ``timm.models.save_for_hf`` writes it
  (``config.json`` + ``model.safetensors``), at the model's own input size (never resized to the
  cache's resolution); ``cli extract --backbone timm --weights OUT``. EfficientNet-Lite0/2 run on
  timm and are written the same way (``--backbone timm``).

Every tensor a tail run did not tune (below layer K) is the original's, every tuned tensor the
run's. Beside the
weights, ``conversion.json`` (`backbones.weights.NOTE_FILE`) records where they come from; its
``description`` ("tuned by CHECKPOINT, tail from layer K, epoch E; from weights ID"; an e2e run: "whole
backbone (e2e)") becomes the
``weights_note`` of every cache extracted from the folder, and ``cli info`` prints it.

The folder is written under a hidden temporary name beside OUT (``.OUT.export-PID``) and renamed
to OUT only when complete, so an interrupted export leaves no folder that looks complete. An OUT
that exists and is not empty is refused unless ``overwrite``; the run's checkpoint and the
original weights are never replaced.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backbones.encoders import ImageEncoder, TextEncoder
from backbones.weights import NOTE_FILE, state_dict_hash
from cache.errors import InputError
from cache.progress import no_loading_bar_off_a_terminal
from cache.store import MODALITIES
from heads.checkpoint import load_checkpoint
from heads.sources import TokenSource, list_sources, source_class, source_kinds

Encoder = ImageEncoder | TextEncoder


@dataclass(frozen=True)
class ExportedBackbone:
    """What `export_backbone` wrote: the folder, the ``cli extract`` options that load it, the
    backbone names of the tuned tensors, and the provenance note."""

    out: Path
    extract_options: str
    tuned: list[str]
    description: str
    epoch: int


def export_backbone(checkpoint: str | Path, side: str, out: str | Path,
                    overwrite: bool = False) -> ExportedBackbone:
    """Write the ``side`` backbone tuned by the tail or e2e run of ``checkpoint`` to ``out``
    (see the module docstring). InputError naming the file: ``out`` exists and is not empty (without
    ``overwrite``) or is a file, the checkpoint did not tune ``side``, the original weights are
    missing or changed, or the backbone has no export form."""
    if side not in MODALITIES:
        raise InputError(f"unknown side {side!r}; one of {', '.join(MODALITIES)}")
    checkpoint, out = Path(checkpoint), Path(out)
    _check_out(out, overwrite)
    state = load_checkpoint(checkpoint)
    kind = source_kinds(state["config"])[side]
    source_of = source_class(kind)
    if source_of.export_note is None or side not in state.get("sources", {}):
        tuned = sorted(state.get("sources", {})) or "none"
        exportable = [k for k in list_sources() if source_class(k).export_note is not None]
        raise InputError(f"{checkpoint}: the {side} side of this run was not tuned "
                         f"(data.{side}_source is {kind!r}; tuned sides: {tuned}); only a "
                         f"{' or '.join(exportable)} side has a backbone to export")
    features = state["features"][side]
    encoder = _original_encoder(checkpoint, side, features, source_of.export_layer(features))
    _refuse_replacing(out, [checkpoint, Path(encoder.weights_id)])
    tuned = _load_tuned(checkpoint, side, source_of.for_export(encoder, str(checkpoint)),
                        encoder, state["sources"][side])
    write = _writer(checkpoint, side, encoder)
    form = "timm" if write is _write_timm else features["encoder"]
    option = (f"--text-encoder {form} --text-weights" if side == "text" else
              f"--backbone {form} --weights")
    extract = f"{option} {out}" + ("" if side == "text" else
                                    f" --resolution {features['resolution']}")
    original = encoder.weights_id + (f" ({encoder.weights_note})" if encoder.weights_note else "")
    description = (f"tuned by {checkpoint.resolve()}, {source_of.export_note.format(**features)}, "
                   f"epoch {state['epoch']}; from weights {original}")
    note = {
        "description": description,
        "tuned_by": str(checkpoint.resolve()),
        "side": side,
        "encoder": features["encoder"],
        "source": kind,
        "layer": features["layer"],
        "epoch": state["epoch"],
        "dev": state.get("dev", {}),
        "original_weights_id": encoder.weights_id,
        "original_weights_hash": encoder.weights_hash,
        "original_weights_note": encoder.weights_note,
        "weights_hash": state_dict_hash(encoder.model),
        "tuned_tensors": tuned,
        "extract": f"cli extract {extract}",
    }

    def fill(folder: Path) -> None:
        write(encoder, folder)
        text = json.dumps(note, indent=2, default=str) + "\n"
        (folder / NOTE_FILE).write_text(text, encoding="utf-8")

    _write_atomically(out, fill)
    return ExportedBackbone(out, extract, tuned, description, state["epoch"])


# ------------------------------------------------------------------------------------- the model


def _original_encoder(checkpoint: Path, side: str, features: dict[str, Any],
                      layer: int) -> Encoder:
    """The run's backbone with its original weights, loaded as ``cli extract`` loads it, at
    ``layer`` (a tail: the run's layer K; e2e: the last); InputError naming the checkpoint and the
    weights when they are missing or no longer hash to the run's ``weights_hash``."""
    from backbones.registry import create_image_encoder, create_text_encoder

    name, weights = features["encoder"], features["weights_id"]
    try:
        if side == "image":
            # timm resizes a ViT's position embeddings to a resolution other than its own, and the
            # folder must hold the weights as loaded; transformers ViTs interpolate at run time
            resolution = None if name == "timm" else features["resolution"]
            encoder = create_image_encoder(name, weights, layer, resolution)
        else:   # the caption length plays no part in the weights; 2 fits every model
            encoder = create_text_encoder(name, weights, layer, max_length=2)
    except InputError as err:
        raise InputError(f"{checkpoint}: cannot load the original {side} backbone it tuned "
                         f"({name}, weights {weights}): {err}") from err
    if encoder.weights_hash != features["weights_hash"]:
        raise InputError(f"{checkpoint}: the original {side} weights {weights} hash to "
                         f"{encoder.weights_hash}, but the run was tuned from weights "
                         f"{features['weights_hash']}; they changed since (restore them)")
    return encoder


def _load_tuned(checkpoint: Path, side: str, source: TokenSource, encoder: Encoder,
                tuned_state: dict[str, Any]) -> list[str]:
    """Load the run's tuned state into ``source``, made of ``encoder.model``'s modules (so the
    model changes in place); returns the model's names of the tensors it replaced."""
    owner = {id(tensor): name for name, tensor in encoder.model.state_dict(keep_vars=True).items()}
    names = {}
    for name, tensor in source.state_dict(keep_vars=True).items():
        if id(tensor) not in owner:
            raise InputError(f"{checkpoint}: the tuned {encoder.name} part's {name} is not a "
                             "tensor of its backbone; this backbone cannot be exported yet")
        names[name] = owner[id(tensor)]
    try:
        source.load_state_dict(tuned_state)
    except RuntimeError as exc:
        raise InputError(f"{checkpoint}: its tuned {side} weights do not fit the backbone "
                         f"{encoder.weights_id} ({str(exc).splitlines()[0]})") from exc
    return sorted(names.values())


# ----------------------------------------------------------------------------------- the folder


def _writer(checkpoint: Path, side: str, encoder: Encoder) -> Callable[[Encoder, Path], None]:
    """How the loaded model of ``encoder`` is saved so that ``cli extract --weights`` loads it."""
    from transformers import PreTrainedModel

    if isinstance(encoder.model, PreTrainedModel):
        return _write_transformers
    if getattr(encoder.model, "pretrained_cfg", None) is not None:
        return _write_timm
    raise InputError(f"{checkpoint}: no export form for the {side} backbone "
                     f"{type(encoder.model).__name__} ({encoder.name})")


def _write_transformers(encoder: Encoder, folder: Path) -> None:
    with no_loading_bar_off_a_terminal():     # its "Writing model shards" bar, in a log file
        encoder.model.save_pretrained(folder)
    if getattr(encoder, "tokenizer", None) is not None:   # text encoders: cli extract needs it
        encoder.tokenizer.save_pretrained(folder)


def _write_timm(encoder: Encoder, folder: Path) -> None:
    from timm.models import save_for_hf

    save_for_hf(encoder.model, folder, safe_serialization=True)


def _check_out(out: Path, overwrite: bool) -> None:
    if out.is_file() or (out.exists() and not out.is_dir()):
        raise InputError(f"{out}: exists and is not a folder (--out names the folder to write)")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise InputError(f"{out}: exists and is not empty; pass --overwrite to replace it")


def _refuse_replacing(out: Path, keep: list[Path]) -> None:
    """InputError when writing ``out`` would replace one of ``keep`` (the checkpoint, the original
    weights) or a folder holding it."""
    target = out.resolve()
    for path in keep:
        if path.exists() and (path.resolve() == target or target in path.resolve().parents):
            raise InputError(f"{out}: holds {path}, which the export reads; write elsewhere")


def _write_atomically(out: Path, fill: Callable[[Path], None]) -> None:
    """``fill`` a temporary folder beside ``out``, then rename it to ``out`` (replacing an empty or
    overwritten folder only once the new one is complete)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.export-{os.getpid()}"
    old = out.parent / f".{out.name}.replaced-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        fill(tmp)
        replaced = out.exists()
        if replaced:
            os.replace(out, old)
        try:
            os.replace(tmp, out)
        except OSError:
            if replaced:
                os.replace(old, out)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
