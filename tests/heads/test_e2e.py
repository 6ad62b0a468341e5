"""``e2e`` token sources: photos and captions through whole tiny backbones, trained with the head
through ``cli train-head``, evaluated by ``cli eval`` from the photos, the references' augmentations,
and the recipe controls (layer-wise lr decay, frozen first epochs, gradient checkpointing)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from torch import nn

from backbones.encoders import group_depths, group_matcher
from backbones.tails import Tail
from backbones.transforms import training_transform
from cache.batch import IdsBatch, PixelBatch
from cache.store import ImageCache, TextCache
from heads.checkpoint import load_checkpoint
from heads.model import RetrievalModel, create_model
from heads.raw_inputs import CaptionIds, WordPieceAugment
from heads.sources import BackboneTokens, SourceOptions, build_source
from train.config import load_config
from train.evaluate import evaluate
from train.trainer import Trainer, sync_head_batchnorm
from tests.extract.cli_helpers import run_cli
from tests.heads.tail_world import (DATASET, TailWorld, make_tail_world, split_caches,
                                    tail_overrides, train_cli, assert_refused)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> TailWorld:
    return make_tail_world(tmp_path_factory.mktemp("e2e"))


def _caches(world: TailWorld, split: str) -> tuple[ImageCache, TextCache]:
    """The last-layer caches an e2e run reads (for their photo files and word pieces)."""
    return split_caches(world, split, "dinov2", "bert")


def e2e_overrides(world: TailWorld, image: str = "e2e", text: str = "e2e",
                  **optim: object) -> list[str]:
    return tail_overrides(world, image, text, image_tag="dinov2", text_tag="bert", **optim)


def test_an_e2e_source_without_augmentation_is_the_extraction(world: TailWorld) -> None:
    """Encoding a split through an e2e source gives the tokens ``cli extract`` cached (fp16)."""
    for cache in _caches(world, "test"):
        source = build_source("e2e", cache).eval()
        (rows, batch), *_ = list(source.batches(cache, 5, np.array([4, 0, 2])))
        assert isinstance(batch, PixelBatch if cache.attrs.modality == "image" else IdsBatch)
        with torch.no_grad():
            out = source(batch)
        cached, lengths = cache.read(rows)
        assert out.tokens.shape == cached.shape
        np.testing.assert_array_equal(out.mask.sum(1).numpy(), lengths)
        np.testing.assert_allclose(out.tokens.numpy(), cached.astype(np.float32), atol=2e-2,
                                   rtol=1e-2)


def test_an_e2e_run_tunes_whole_backbones_and_eval_reads_the_photos(world: TailWorld,
                                                                     tmp_path: Path) -> None:
    run = tmp_path / "run"
    code, output = train_cli(run, e2e_overrides(world, epochs=1))
    assert code == 0, output
    state = load_checkpoint(run / "best.pt")
    assert "optimizer" not in state and "optimizer" in load_checkpoint(run / "last.pt")
    assert sorted(state["sources"]) == ["image", "text"]
    data = state["config"]["data"]
    for side, cache in zip(("image", "text"), _caches(world, "train")):
        assert data[f"{side}_backbone"] == {"encoder": cache.attrs.encoder, "layer": -1,
                                            "weights_id": cache.attrs.weights_id,
                                            "weights_hash": cache.attrs.weights_hash}
        pretrained = build_source("e2e", cache).state_dict()
        tuned = state["sources"][side]
        assert tuned.keys() == pretrained.keys()
        changed = [n for n in tuned if not torch.equal(tuned[n], pretrained[n])]
        assert any(".embeddings." in n for n in changed), side     # the bottom trains too
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 80 // 40                   # an epoch over the 80 photos, not captions

    code, output = run_cli("eval", "--checkpoint", run / "best.pt", "--split", "test",
                           "--device", "cpu")
    assert code == 0, output
    report = json.loads((run / "eval-test.json").read_text())
    images, texts = _caches(world, "test")
    assert evaluate(create_model(state, images, texts), images, texts)["metrics"] \
        == report["metrics"]

    moved = Path(shutil.copytree(world.data / "images", tmp_path / "moved"))
    code, output = run_cli("eval", "--checkpoint", run / "best.pt", "--photos", moved,
                           "--json", tmp_path / "moved.json")
    assert code == 0, output
    assert json.loads((tmp_path / "moved.json").read_text())["metrics"] == report["metrics"]
    missing = json.loads((tmp_path / "moved.json").read_text())["images_cache"]
    (moved / ImageCache(missing).paths[3]).unlink()
    code, output = run_cli("eval", "--checkpoint", run / "best.pt", "--photos", moved)
    assert code == 2 and "photo of" in output and "1 of 8 missing" in output, output


def test_bad_e2e_inputs_stop_before_any_step_and_write_nothing(world: TailWorld,
                                                               tmp_path: Path) -> None:
    def refused(sets: list[str], *needles: str) -> None:
        assert_refused(tmp_path / "run", sets, *needles)

    photos = Path(shutil.copytree(world.data / "images", tmp_path / "photos"))
    dev_photo = ImageCache(world.features / DATASET / "dev" / "image-dinov2.h5").paths[0]
    (photos / dev_photo).unlink()
    refused(e2e_overrides(world, text="cache") + [f"data.images_root={photos}"],
            str(photos / dev_photo), "not found", "1 of 8 missing")
    refused(e2e_overrides(world, text="cache") + [f"data.images_root={tmp_path / 'none'}"],
            "the photo folder given does not exist")
    refused(e2e_overrides(world, image="cache") + ["data.text_backbone.layer=4"],
            "text-bert.h5: not the text backbone data.text_backbone names",
            "layer is -1, the config names 4")


def test_word_piece_augment_perturbs_whole_words_at_the_reference_rates() -> None:
    # vocabulary: 0 [PAD], 1 [CLS], 2 [SEP], 3 [MASK], 4..9 words, 10..11 "##" pieces
    continuation = np.zeros(12, bool)
    continuation[[10, 11]] = True
    keep = np.zeros(12, bool)
    keep[[0, 1, 2, 3]] = True
    augment = WordPieceAugment(0.2, continuation, keep, mask_id=3, vocab_size=12)
    caption = np.array([1, 4, 10, 11, 2])                 # one word of three pieces
    counts = {"masked": 0, "random": 0, "deleted": 0, "kept": 0}
    for seed in range(4000):
        out = augment(caption, np.random.default_rng(seed))
        assert out[0] == 1 and out[-1] == 2                 # [CLS] / [SEP] stay
        np.testing.assert_array_equal(out, augment(caption, np.random.default_rng(seed)))
        if len(out) == 2:
            counts["deleted"] += 1                          # all three pieces go
        elif (out[1:4] == 3).all():
            counts["masked"] += 1
        elif np.array_equal(out, caption):
            counts["kept"] += 1
        else:
            counts["random"] += 1
    words = np.array([1, 4, 10, 5, 11, 2])                  # two words: pieces follow their word
    for seed in range(200):
        out = augment(words, np.random.default_rng(seed))
        assert len(out) in (2, 4, 6)
    rates = {k: v / 4000 for k, v in counts.items()}
    assert rates["masked"] == pytest.approx(0.10, abs=0.015)
    assert rates["random"] == pytest.approx(0.02, abs=0.008)   # random ids may equal the old
    assert rates["deleted"] == pytest.approx(0.08, abs=0.015)


def test_caption_ids_draw_per_row_and_epoch(world: TailWorld) -> None:
    _, texts = _caches(world, "train")
    tokenizer = build_source("e2e", texts).encoder.tokenizer
    reader = CaptionIds(texts, WordPieceAugment.for_tokenizer(tokenizer, 0.5), seed=3)
    rows = np.arange(0, 40, 3)
    first, again = reader.read(rows, epoch=0), reader.read(rows[::-1], epoch=0)
    np.testing.assert_array_equal(first.input_ids[0], again.input_ids[-1][:first.input_ids.shape[1]])
    assert not torch.equal(first.input_ids, reader.read(rows, epoch=1).input_ids)
    plain = CaptionIds(texts).read(rows)
    np.testing.assert_array_equal(plain.input_ids[0][plain.mask[0]].numpy(),
                                  texts.input_ids(int(rows[0])))


def test_training_transform_crops_flips_and_normalises(world: TailWorld) -> None:
    from PIL import Image

    images, _ = _caches(world, "train")
    encoder = build_source("e2e", images).encoder
    augment = training_transform(encoder.transform, (0.6, 1.0))
    photo = Image.open(world.data / "images" / images.paths[0]).convert("RGB")
    torch.manual_seed(0)
    views = torch.stack([augment(photo) for _ in range(8)])
    assert views.shape == (8, 3, 32, 32) and views.dtype == torch.float32
    assert (views[1:] - views[0]).abs().amax() > 0.1         # random crops differ
    plain = encoder.transform(photo)
    assert plain.shape == views.shape[1:]
    assert abs(float(views.mean()) - float(plain.mean())) < 0.5   # same normalisation


def test_layer_decay_depths_follow_the_backbones_parameter_groups() -> None:
    """timm's layer-decay rule over a backbone's ``group_matcher``: the stem deepest, block i at
    L - i, what follows the last block (final norm, head conv) at the top; a tail keeps the
    backbone's block indices, so its blocks keep their depths."""
    bert = dict(stem=r"^embeddings", blocks=r"^encoder\.layer\.(\d+)")
    names = ["embeddings.word.weight", "encoder.layer.0.dense.weight",
             "encoder.layer.2.dense.weight", "pooler.weight"]
    assert group_depths(bert, names) == {names[0]: 4, names[1]: 3, names[2]: 1, names[3]: 0}
    tail = Tail({4: nn.Linear(2, 2), 5: nn.Linear(2, 2)}, nn.LayerNorm(2))
    assert group_depths(tail.group_matcher(), ["blocks.4.weight", "blocks.5.weight",
                                               "norm.weight"]) \
        == {"blocks.4.weight": 2, "blocks.5.weight": 1, "norm.weight": 0}
    resnet = timm.create_model("resnet18", pretrained=False)      # stages layer1..layer4
    depths = group_depths(group_matcher(resnet, None), [n for n, _ in resnet.named_parameters()])
    assert depths["conv1.weight"] == depths["bn1.weight"] == 6      # below stage index 0
    assert depths["layer1.0.conv1.weight"] == 4 and depths["layer4.1.bn2.bias"] == 1
    assert depths["fc.weight"] == 0


def test_e2e_lr_layer_decay_and_frozen_first_epochs(world: TailWorld, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    config = load_config(None, e2e_overrides(world, image="cache", epochs=1, lr=0.01,
                                             layer_decay=0.5, backbone_frozen_epochs=1))
    trainer = Trainer(config, tmp_path / "run", show_progress=False)
    assert isinstance(trainer.model.text_source, BackboneTokens)
    lr_of = {id(p): g["lr"] for g in trainer.optimizer.param_groups for p in g["params"]}
    params = dict(trainer.model.text_source.named_parameters())
    assert lr_of[id(params["encoder.model.encoder.layer.2.attention.self.query.weight"])] \
        == pytest.approx(0.001 * 0.5)
    assert lr_of[id(params["encoder.model.embeddings.word_embeddings.weight"])] \
        == pytest.approx(0.001 * 0.5 ** 4)
    before = {n: p.detach().clone() for n, p in params.items()}
    head_before = {n: p.detach().clone() for n, p in trainer.head.named_parameters()}
    trainer.run()
    assert all(torch.equal(before[n], p) for n, p in params.items())      # frozen epoch 0
    assert any(not torch.equal(head_before[n], p) for n, p in trainer.head.named_parameters())
    assert "epoch 0: tuned text backbone frozen" in capsys.readouterr().out
    trainer.train_epoch(1)                                                  # epoch 1 tunes it
    assert any(not torch.equal(before[n], p) for n, p in params.items())


@pytest.mark.parametrize("kind", ["tail", "e2e"])
def test_gradient_checkpointing_keeps_the_gradient(world: TailWorld, kind: str) -> None:
    _, texts = _caches(world, "train") if kind == "e2e" else (None, TextCache(
        world.features / DATASET / "train" / "text-bert_l1.h5"))
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        source = build_source(kind, texts, SourceOptions(grad_checkpointing=checkpointing))
        source.eval()                                            # no dropout: same forward
        (_, batch), *_ = list(source.batches(texts, 6))
        source(batch.to("cpu", dtype=torch.float32)).tokens.square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in source.named_parameters()
                      if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6)


def test_a_cnn_backbone_keeps_its_batchnorm_frozen(tmp_path: Path) -> None:
    import timm
    from timm.models import save_for_hf

    from backbones.registry import create_image_encoder

    torch.manual_seed(2)
    save_for_hf(timm.create_model("test_resnet"), tmp_path / "resnet", safe_serialization=True)
    source = BackboneTokens(create_image_encoder("timm", str(tmp_path / "resnet"), -1, 32))
    source.train()
    norms = [m for m in source.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and not any(m.training for m in norms)
    stats = norms[0].running_mean.clone()
    source(PixelBatch(torch.randn(2, 3, 32, 32))).tokens.sum().backward()
    assert torch.equal(norms[0].running_mean, stats) and norms[0].weight.grad is not None

    head = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    model = RetrievalModel(head, image_source=source)      # DDP on CUDA: only the head syncs
    sync_head_batchnorm(model)
    assert isinstance(model.head[1], torch.nn.SyncBatchNorm)
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in source.modules())


def test_an_e2e_backbone_exports_as_weights_cli_extract_loads(world: TailWorld,
                                                               tmp_path: Path) -> None:
    from backbones.registry import create_text_encoder

    run = tmp_path / "run"
    code, output = train_cli(run, e2e_overrides(world, image="cache", epochs=1))
    assert code == 0, output
    code, output = run_cli("export-backbone", run / "best.pt", "--side", "text", "--out",
                           tmp_path / "tuned")
    assert code == 0, output
    note = json.loads((tmp_path / "tuned" / "conversion.json").read_text())
    assert note["source"] == "e2e" and "whole backbone (e2e)" in note["description"]
    tuned = load_checkpoint(run / "best.pt")["sources"]["text"]
    loaded = create_text_encoder("bert", str(tmp_path / "tuned"), max_length=8).model.state_dict()
    assert {f"encoder.model.{n}" for n in loaded} == set(tuned)
    for name, tensor in loaded.items():
        assert torch.equal(tensor, tuned[f"encoder.model.{name}"]), name
    code, output = run_cli("export-backbone", run / "best.pt", "--side", "image", "--out",
                           tmp_path / "image")
    assert code == 2 and "only a tail or e2e side has a backbone to export" in output, output


def test_the_augmentation_shift_script_reads_the_same_rows_both_ways(world: TailWorld,
                                                                      tmp_path: Path) -> None:
    import re
    import subprocess
    import sys

    run = tmp_path / "run"
    code, output = train_cli(run, tail_overrides(world, image_tag="dinov2", text_tag="bert",
                                                 epochs=1))
    assert code == 0, output
    script = Path(__file__).resolve().parents[2] / "scripts" / "augmentation_shift.py"
    done = subprocess.run([sys.executable, str(script), "--checkpoint", str(run / "best.pt"),
                           "--batches", "2", "--batch-size", "16", "--threads", "1"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    losses = dict(re.findall(r"^  (.+?)\s+loss (\d+\.\d+)$", done.stdout, re.MULTILINE))
    assert len(losses) == 5, done.stdout
    assert float(losses["e2e, no augmentation"]) == pytest.approx(
        float(losses["cached tokens"]), abs=2e-3)                  # fp16 rounding of the cache


def test_photos_without_a_recorded_folder_and_tokenizers_without_mask_are_refused(
        tmp_path: Path) -> None:
    from transformers import BertTokenizer

    from cache.errors import InputError
    from heads.raw_inputs import images_root
    from tests.heads.synthetic_caches import write_dataset

    synthetic = write_dataset(tmp_path / "synthetic", train=4, dev=2, test=2)
    images = ImageCache(next(synthetic.rglob("image-*.h5")))
    with pytest.raises(InputError, match=r"image-.*\.h5: the cache does not record where its "
                                         r"photos are .* set data\.images_root"):
        images_root(images, None)
    assert images_root(images, tmp_path) == tmp_path            # data.images_root / --photos
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\ndog\n")
    tokenizer = BertTokenizer(vocab_file=str(tmp_path / "vocab.txt"), mask_token=None)
    with pytest.raises(InputError, match="has no \\[MASK\\] token.*data.text_augment=0"):
        WordPieceAugment.for_tokenizer(tokenizer)


def test_a_relative_photo_folder_of_an_older_cache_resolves_where_its_extraction_ran(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Caches written before folders were recorded absolute hold the ``--images`` path as typed:
    relative to the recorded extraction directory, else to the current directory (as they were
    always read), else to the cache file's folder."""
    import h5py

    from cache.errors import InputError
    from heads.raw_inputs import images_root
    from tests.heads.synthetic_caches import write_dataset

    path = next(write_dataset(tmp_path / "synthetic", train=4, dev=2, test=2).rglob("image-*.h5"))

    def record(**extra: str) -> ImageCache:
        with h5py.File(path, "r+") as f:
            f.attrs["extra"] = json.dumps(extra)
        return ImageCache(path)

    ran_in, elsewhere = tmp_path / "ran_in", tmp_path / "elsewhere"
    (ran_in / "photos").mkdir(parents=True)
    (path.parent / "photos").mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert images_root(record(images_root="photos", extraction_cwd=str(ran_in)), None) == (
        ran_in / "photos")
    assert images_root(record(images_root="photos"), None) == path.parent.resolve() / "photos"
    (elsewhere / "photos").mkdir()
    assert images_root(record(images_root="photos"), None) == elsewhere / "photos"
    absolute = record(images_root=str(ran_in / "photos"), extraction_cwd=str(elsewhere))
    assert images_root(absolute, None) == ran_in / "photos"
    with pytest.raises(InputError, match=r"nowhere: the photo folder recorded in .*image-.*\.h5 "
                                         r"does not exist.*--photos DIR"):
        images_root(record(images_root="nowhere", extraction_cwd=str(ran_in)), None)
