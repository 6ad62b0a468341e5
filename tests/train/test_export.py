"""``cli export-backbone``: tune once, extract a tuned cache, train any head from it.

A tail run on the layer-K caches of the tiny DINOv2 / BERT of `tests.heads.tail_world` (and of a
tiny transformers ViT and timm's test ViT) is exported per side; the folder loads with
``cli extract --weights`` / ``--text-weights``, holds the original tensors below K and the tuned
ones from K up, and a last-layer cache extracted from it equals what the tuned tail gives on the
layer-K cache (the tail reads fp16-rounded layer-K states, the cache is fp16: they agree to fp16
rounding). Bad input is one line naming the file, and an interrupted export leaves nothing that
looks complete.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from timm.models import save_for_hf

from backbones.registry import create_image_encoder, create_text_encoder
from cache.batch import TokenBatch
from cache.datasets import token_batches
from cache.store import ImageCache, TextCache
from heads.checkpoint import load_checkpoint
from heads.model import create_model
from train.config import load_config
from train.trainer import train
from tests.extract.cli_helpers import run_cli
from tests.heads.tail_world import (DATASET, LAYER, TINY, TailWorld, copy_backbones,
                                    make_tail_world, tail_overrides)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# the tail reads fp16 layer-K states, the tuned cache is fp16: states up to 3.4 here, where an fp16
# step is 2e-3 (measured gaps: 1.9e-3 DINOv2, 2.1e-3 BERT, 1.9e-3 timm ViT)
FP16_ATOL = 5e-3


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> TailWorld:
    return make_tail_world(tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def run(world: TailWorld, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run tuning both sides' blocks after layer K (one epoch): its best.pt."""
    out = tmp_path_factory.mktemp("runs") / "tail"
    train(load_config(None, tail_overrides(world, "tail", "tail", epochs=1)), out,
          show_progress=False)
    return out / "best.pt"


def _export(checkpoint: Path, side: str, out: Path, *args: str) -> tuple[int, str]:
    return run_cli("export-backbone", checkpoint, "--side", side, "--out", out, *args)


def _rows(cache: ImageCache | TextCache) -> tuple[torch.Tensor, torch.Tensor]:
    """Every row of a cache as (fp32 tokens, mask)."""
    (_, batch), = token_batches(cache, 10_000)
    return batch.tokens.float(), batch.mask


def _tail_rows(state: dict, side: str, images: ImageCache, texts: TextCache
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """What the run's tuned ``side`` tail gives on every row of its layer-K cache."""
    model = create_model(state, images, texts).eval()
    tokens, mask = _rows(images if side == "image" else texts)
    with torch.no_grad():
        out = model.sources()[side](TokenBatch(tokens, mask))
    return out.tokens, mask


def _loaded(side: str, name: str, folder: Path) -> dict[str, torch.Tensor]:
    """The state dict of the backbone ``cli extract`` loads from ``folder`` (transformers renames
    some tensors between the file and the model: compare loaded models, not files)."""
    if side == "text":
        return create_text_encoder(name, str(folder), max_length=8).model.state_dict()
    return create_image_encoder(name, str(folder), resolution=None if name == "timm" else 32
                                ).model.state_dict()


def _check_weights(exported: dict, original: dict, tuned: dict, expected_names: set[str],
                   rename) -> None:
    """Exported tensors: the tuned ones under ``expected_names`` (the backbone's names of the
    checkpoint's ``tail.*`` tensors, ``rename``d), the original ones everywhere else."""
    assert exported.keys() == original.keys()
    mapped = {rename(name): tensor for name, tensor in tuned.items()}
    assert mapped.keys() == expected_names
    for name, tensor in exported.items():
        assert torch.equal(tensor, mapped[name] if name in mapped else original[name]), name
    assert any(not torch.equal(mapped[n], original[n]) for n in mapped)   # the run did tune


def _caches(features: Path, split: str, image_tag: str, text_tag: str
            ) -> tuple[ImageCache, TextCache]:
    folder = features / DATASET / split
    return ImageCache(folder / f"image-{image_tag}.h5"), TextCache(folder / f"text-{text_tag}.h5")


def test_tune_once_export_extract_a_tuned_cache_and_train_any_head(world: TailWorld, run: Path,
                                                                   tmp_path: Path) -> None:
    state = load_checkpoint(run)
    folders = {"dinov2": tmp_path / "tuned" / "dinov2", "bert": tmp_path / "tuned" / "bert"}
    code, output = _export(run, "image", folders["dinov2"])
    assert code == 0, output
    assert f"extract with: cli extract --backbone dinov2 --weights {folders['dinov2']} " \
           "--resolution 32" in output
    code, output = _export(run, "text", folders["bert"])
    assert code == 0, output
    assert f"extract with: cli extract --text-encoder bert --text-weights {folders['bert']}" \
           in output
    assert (folders["bert"] / "tokenizer_config.json").is_file()      # cli extract needs it

    # the weights: original below layer K, tuned from K up (DINOv2: and the final layernorm)
    blocks = [str(i) for i in range(LAYER, 3)]
    for name, side, norm in (("dinov2", "image", "layernorm."), ("bert", "text", None)):
        original = _loaded(side, name, world.models[name])
        expected = {n for n in original
                    if n.split(".")[:2] == ["encoder", "layer"] and n.split(".")[2] in blocks
                    or norm and n.startswith(norm)}
        _check_weights(_loaded(side, name, folders[name]), original, state["sources"][side],
                       expected, lambda n: n.replace("tail.blocks.", "encoder.layer.")
                                            .replace("tail.norm.", "layernorm."))
        note = json.loads((folders[name] / "conversion.json").read_text())
        assert note["tuned_tensors"] == sorted(expected)

    # extract the training and dev splits at the last layer from the exported folders
    tuned = TailWorld(world.data, folders, tmp_path / "features")
    tuned.extract("--split", "train,dev", "--tag", "dinov2_tuned", "--text-tag", "bert_tuned")
    images, texts = _caches(tuned.features, "train", "dinov2_tuned", "bert_tuned")
    layer_k = _caches(world.features, "train", f"dinov2_l{LAYER}", f"bert_l{LAYER}")
    untuned = _caches(world.features, "train", "dinov2", "bert")
    epoch = state["epoch"]
    for side, cache, before in (("image", images, untuned[0]), ("text", texts, untuned[1])):
        got, mask = _rows(cache)
        want, want_mask = _tail_rows(state, side, *layer_k)
        assert torch.equal(mask, want_mask)
        gap = (got - want)[mask].abs().max().item()
        moved = (_rows(before)[0] - want)[mask].abs().max().item()
        assert gap < FP16_ATOL and moved > 10 * gap, (side, gap, moved)   # tuning shows
        attrs = cache.attrs
        assert attrs.weights_note.startswith(f"tuned by {run.resolve()}, tail from layer "
                                             f"{LAYER}, epoch {epoch}; from weights "), attrs
        note = json.loads((Path(attrs.weights_id) / "conversion.json").read_text())
        assert attrs.weights_hash == note["weights_hash"]
        assert note["original_weights_hash"] == state["features"][side]["weights_hash"]

    code, output = run_cli("info", images.path)
    assert code == 0 and f"tuned by {run.resolve()}" in output, output

    # any head trains on the tuned caches (here vse, with cache sources)
    sets = tail_overrides(tuned, image_tag="dinov2_tuned", text_tag="bert_tuned",
                          epochs=1) + ["head.name=vse"]
    summary = train(load_config(None, sets), tmp_path / "vse", show_progress=False)
    assert summary.best_epoch == 0
    trained = load_checkpoint(tmp_path / "vse" / "best.pt")
    assert trained["head_name"] == "vse"
    assert trained["features"]["image"]["weights_id"] == str(folders["dinov2"].resolve())


def _save_vit(folder: Path) -> None:
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(6)
    ViTModel(ViTConfig(image_size=32, patch_size=8, **TINY),
             add_pooling_layer=False).save_pretrained(folder)


def _save_timm_vit(folder: Path) -> None:
    torch.manual_seed(5)
    save_for_hf(timm.create_model("test_vit").eval(), folder, safe_serialization=True)


# backbone: (save the original, layer K, the backbone's names of the tuned tensors, the backbone's
# names of the tail's blocks and norm, what cli info says first)
VITS = {
    "vit": (_save_vit, 1, ("layers.1.", "layers.2.", "layernorm."), ("layers.", "layernorm."),
            "tuned by"),                           # transformers: hidden_states[1]; layers 1, 2
    "timm": (_save_timm_vit, 3, ("blocks.4.", "blocks.5.", "norm."), ("blocks.", "norm."),
             "timm test_vit; tuned by"),          # timm: block 3 of 6; blocks 4, 5 and the norm
}


@pytest.mark.parametrize("backbone", sorted(VITS))
def test_a_vit_tail_exports_in_the_form_its_backbone_loads(world: TailWorld, tmp_path: Path,
                                                           backbone: str) -> None:
    """A transformers ViT as a save_pretrained folder; a timm ViT as a timm folder at its own
    input size (160 px), although the run's caches were written at 32 px."""
    save, layer, tuned_prefixes, (blocks, norm), note_start = VITS[backbone]
    original_folder = tmp_path / "models" / backbone
    save(original_folder)
    features = tmp_path / "features"

    def extract(weights: Path, *args: object) -> None:
        code, output = run_cli(
            "extract", "--backbone", backbone, "--weights", weights, "--resolution", 32,
            "--dataset", DATASET, "--data-path", world.data, "--images", world.data / "images",
            "--out", features, "--device", "cpu", "--workers", 0, *args)
        assert code == 0, output

    extract(original_folder, "--layer", layer, "--tag", "vit_k", "--split", "train,dev",
            "--text-encoder", "bert", "--text-weights", world.models["bert"], "--max-length", 48)
    run = tmp_path / "run"
    train(load_config(None, tail_overrides(TailWorld(world.data, {}, features), image="tail",
                                           image_tag="vit_k", text_tag="bert", epochs=1)),
          run, show_progress=False)
    state = load_checkpoint(run / "best.pt")

    out = tmp_path / "tuned"
    code, output = _export(run / "best.pt", "image", out)
    assert code == 0, output
    assert f"extract with: cli extract --backbone {backbone} --weights {out} --resolution 32" \
        in output
    original = _loaded("image", backbone, original_folder)
    expected = {n for n in original if n.startswith(tuned_prefixes)}
    exported = _loaded("image", backbone, out)
    _check_weights(exported, original, state["sources"]["image"], expected,
                   lambda n: n.replace("tail.blocks.", blocks).replace("tail.norm.", norm))
    if backbone == "timm":
        assert json.loads((out / "config.json").read_text())["architecture"] == "test_vit"
        assert exported["pos_embed"].shape == (1, 101, 64)     # 160 px (10 x 10 + CLS), not 32

    extract(out, "--tag", "vit_tuned", "--split", "train")
    cache = ImageCache(features / DATASET / "train" / "image-vit_tuned.h5")
    got, mask = _rows(cache)
    want, _ = _tail_rows(state, "image", *_caches(features, "train", "vit_k", "bert"))
    assert (got - want)[mask].abs().max().item() < FP16_ATOL
    assert cache.attrs.weights_note.startswith(f"{note_start} {(run / 'best.pt').resolve()}")


def test_bad_input_is_one_line_naming_the_file(world: TailWorld, run: Path,
                                               tmp_path: Path) -> None:
    # a run that tuned nothing, a side a run did not tune, no checkpoint at all
    cache_run = tmp_path / "cache_run"
    train(load_config(None, tail_overrides(world, epochs=1)), cache_run, show_progress=False)
    code, message = _export(cache_run / "best.pt", "image", tmp_path / "out")
    assert code == 2 and str(cache_run / "best.pt") in message, message
    assert "the image side of this run was not tuned (data.image_source is 'cache'" in message
    code, message = _export(tmp_path / "nope.pt", "text", tmp_path / "out")
    assert code == 2 and f"{tmp_path / 'nope.pt'}: checkpoint not found" in message, message
    assert not (tmp_path / "out").exists()

    # an existing folder: kept unless --overwrite; an empty one is fine
    out = tmp_path / "taken"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    code, message = _export(run, "text", out)
    assert code == 2 and message == f"{out}: exists and is not empty; pass --overwrite to " \
                                    "replace it", message
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    code, output = _export(run, "text", out, "--overwrite")
    assert code == 0, output
    assert not (out / "mine.txt").exists() and (out / "config.json").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _export(run, "text", empty)[0] == 0
    code, message = _export(run, "text", run.parent, "--overwrite")     # would delete the run
    assert code == 2 and f"{run.parent}: holds {run}" in message, message
    assert run.is_file()

    # the original weights changed since the run, or are gone
    own = copy_backbones(world, tmp_path / "own")
    own.extract("--layer", LAYER, "--text-layer", LAYER, "--tag", f"dinov2_l{LAYER}",
                "--text-tag", f"bert_l{LAYER}", "--split", "train,dev")
    own_run = tmp_path / "own_run"
    train(load_config(None, tail_overrides(own, text="tail", epochs=1)), own_run,
          show_progress=False)
    code, message = _export(own_run / "best.pt", "image", tmp_path / "out")
    assert code == 2 and message.startswith(
        f"{own_run / 'best.pt'}: the image side of this run was not tuned (data.image_source is "
        "'cache'; tuned sides: ['text'])"), message
    weights = own.models["bert"]
    state = load_file(weights / "model.safetensors")
    bias = next(name for name in state if name.endswith("layer.0.output.dense.bias"))
    state[bias] += 0.01
    save_file(state, weights / "model.safetensors", metadata={"format": "pt"})
    code, message = _export(own_run / "best.pt", "text", tmp_path / "out")
    assert code == 2 and str(own_run / "best.pt") in message, message
    assert f"the original text weights {weights.resolve()} hash to" in message
    assert "they changed since" in message
    shutil.rmtree(weights)
    code, message = _export(own_run / "best.pt", "text", tmp_path / "out")
    assert code == 2, message
    assert message.startswith(f"{own_run / 'best.pt'}: cannot load the original text backbone "
                              f"it tuned (bert, weights {weights.resolve()}): weights folder "
                              f"{weights.resolve()} does not exist"), message
    assert not (tmp_path / "out").exists()


def test_an_interrupted_export_leaves_no_folder_that_looks_complete(
        run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import train.export

    def crash(encoder, folder: Path) -> None:
        encoder.model.save_pretrained(folder)       # the weights are there, then the disk fills
        raise OSError("No space left on device")

    monkeypatch.setattr(train.export, "_write_transformers", crash)
    out = tmp_path / "exports" / "bert"
    with pytest.raises(OSError, match="No space left"):
        train.export.export_backbone(run, "text", out)
    assert list((tmp_path / "exports").iterdir()) == []          # no OUT, no temporary folder

    out.mkdir()
    (out / "previous.txt").write_text("an earlier export")
    with pytest.raises(OSError, match="No space left"):
        train.export.export_backbone(run, "text", out, overwrite=True)
    assert [p.name for p in (tmp_path / "exports").iterdir()] == ["bert"]
    assert [p.name for p in out.iterdir()] == ["previous.txt"]   # the old folder is untouched


def test_the_exported_folder_loads_as_the_same_backbone(run: Path, world: TailWorld,
                                                        tmp_path: Path) -> None:
    """``create_*_encoder`` (what ``cli extract`` calls) loads the folders; the tokenizer is the
    original's (same ids for every caption)."""
    for side in ("image", "text"):
        assert _export(run, side, tmp_path / side)[0] == 0
    image = create_image_encoder("dinov2", str(tmp_path / "image"), resolution=32)
    assert image.weights_note.startswith(f"tuned by {run.resolve()}")
    text = create_text_encoder("bert", str(tmp_path / "text"), max_length=48)
    original = create_text_encoder("bert", str(world.models["bert"]), max_length=48)
    captions = (world.data / "train_caps.txt").read_text().splitlines()
    assert text.tokenize(captions) == original.tokenize(captions)
