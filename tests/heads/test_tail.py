"""``tail`` token sources end to end: layer-K caches of tiny backbones written by ``cli extract``,
trained through the real trainer and ``cli train-head``, evaluated by ``cli eval`` through the
tuned blocks, resumed exactly, and refused with one clear error before any training step."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from backbones.tails import tail_from_cache
from cache.datasets import view_of
from cache.errors import InputError
from cache.store import ImageCache, TextCache
from heads.checkpoint import load_checkpoint
from heads.model import RetrievalModel, create_model
from heads.sources import CachedTokens, TailTokens, build_source
from train.config import load_config
from train.evaluate import evaluate
from train.trainer import Trainer, evaluate_split, train
from tests.extract.cli_helpers import run_cli
from tests.heads.synthetic_caches import config_overrides, write_dataset
from tests.heads.tail_world import (DATASET, LAYER, TailWorld, copy_backbones, make_tail_world,
                                    split_caches, tail_overrides, train_cli,
                                    assert_refused)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> TailWorld:
    return make_tail_world(tmp_path_factory.mktemp("tail"))


def test_a_tail_run_tunes_its_blocks_and_eval_encodes_through_them(world: TailWorld,
                                                                    tmp_path: Path) -> None:
    run = tmp_path / "run"
    code, output = train_cli(run, tail_overrides(world, "tail", "tail"))
    assert code == 0, output
    state = load_checkpoint(run / "best.pt")
    assert state["format"] == 2 and sorted(state["sources"]) == ["image", "text"]
    assert sorted(state["model"]) == ["image_fc.bias", "image_fc.weight", "text_fc.bias",
                                      "text_fc.weight"]                 # head names unchanged
    assert state["config"]["optim"]["lr_mult"] == {"image_source": 0.1, "text_source": 0.1}
    for side, cache in zip(("image", "text"), split_caches(world, "train")):
        pretrained = TailTokens(tail_from_cache(cache)).state_dict()
        tuned = state["sources"][side]
        assert tuned.keys() == pretrained.keys()
        blocks = {name.split(".")[2] for name in tuned if name.startswith("tail.blocks.")}
        assert blocks == {"1", "2"}                                     # blocks after K = 1
        for block in blocks:                                            # every block trained
            names = [n for n in tuned if n.startswith(f"tail.blocks.{block}.")]
            assert any(not torch.equal(tuned[n], pretrained[n]) for n in names), (side, block)

    # cli eval encodes the test split (layer-K caches) through the tuned tails
    code, output = run_cli("eval", "--checkpoint", run / "best.pt", "--split", "test",
                           "--device", "cpu", "--save-sims", tmp_path / "tuned.npz")
    assert code == 0, output
    report = json.loads((run / "eval-test.json").read_text())
    images, texts = split_caches(world, "test")
    model = create_model(state, images, texts)
    again = evaluate(model, images, texts, save_sims=tmp_path / "again.npz")
    assert again["metrics"] == report["metrics"]
    tuned_sims = np.load(tmp_path / "tuned.npz")["sims_0"]
    np.testing.assert_array_equal(np.load(tmp_path / "again.npz")["sims_0"], tuned_sims)
    untuned = RetrievalModel(model.head, build_source("tail", images), build_source("tail", texts))
    evaluate(untuned, images, texts, save_sims=tmp_path / "untuned.npz")
    untuned_sims = np.load(tmp_path / "untuned.npz")["sims_0"]
    assert np.abs(untuned_sims - tuned_sims).max() > 1e-3

    # the checkpoint's model scores the dev split exactly as the trainer did at that epoch
    dev_images, dev_texts = split_caches(world, "dev")
    dev = evaluate_split(create_model(state, dev_images, dev_texts), dev_images,
                         dev_texts, state["config"]["eval"], torch.device("cpu"))
    assert dev["metrics"] == state["dev"]


def test_tail_parameters_get_their_lr_and_token_drop_is_off(world: TailWorld, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]
                                                            ) -> None:
    config = load_config(None, tail_overrides(world, text="tail", lr=0.01)
                         + ["data.image_token_drop=0.2", "data.text_token_drop=0.1"])
    config["optim"]["lr_mult"]["text_source.tail.blocks.2"] = 0.5  # a YAML key with dots
    trainer = Trainer(config, tmp_path / "run", show_progress=False)
    assert isinstance(trainer.model.image_source, CachedTokens)
    assert isinstance(trainer.model.text_source, TailTokens)
    lr_of = {id(p): g["lr"] for g in trainer.optimizer.param_groups for p in g["params"]}
    for name, param in trainer.model.text_source.named_parameters():
        expected = 0.005 if name.startswith("tail.blocks.2.") else 0.001
        assert lr_of[id(param)] == pytest.approx(expected), name
    assert all(lr_of[id(p)] == 0.01 for p in trainer.head.parameters())
    assert trainer.dataset.text_drop.p == 0.0 and trainer.dataset.image_drop.p == 0.2
    assert "text token drop 0.1 is turned off" in capsys.readouterr().out


def test_a_tail_run_resumes_exactly(world: TailWorld, tmp_path: Path) -> None:
    """Text tail (BERT, dropout 0.1: the RNG state matters), image cache with token drop."""
    sets = tail_overrides(world, text="tail", warmup_steps=3, milestones="[1]") + [
        "data.image_token_drop=0.2"]
    full = train(load_config(None, sets), tmp_path / "full", show_progress=False)
    first = train(load_config(None, sets + ["optim.epochs=1"]), tmp_path / "cut",
                  show_progress=False)
    assert first.history[0]["loss"] == full.history[0]["loss"]
    config = load_config(None, ["optim.epochs=2"],
                         base=load_checkpoint(tmp_path / "cut" / "last.pt")["config"])
    resumed = train(config, tmp_path / "cut", resume=True, show_progress=False)
    assert [h["epoch"] for h in resumed.history] == [1]
    assert resumed.history[0]["loss"] == full.history[1]["loss"]
    assert resumed.history[0]["dev"] == full.history[1]["dev"]
    a = load_checkpoint(tmp_path / "full" / "last.pt")
    b = load_checkpoint(tmp_path / "cut" / "last.pt")
    assert a["sources"]["text"].keys() == b["sources"]["text"].keys()
    for part in ("model", "text"):
        x = a["model"] if part == "model" else a["sources"]["text"]
        y = b["model"] if part == "model" else b["sources"]["text"]
        assert all(torch.equal(x[k], y[k]) for k in x), part


def test_bad_tail_inputs_stop_before_any_step_and_write_nothing(world: TailWorld,
                                                                tmp_path: Path) -> None:
    def refused(sets: list[str], *needles: str) -> None:
        assert_refused(tmp_path / "run", sets, *needles)

    last = world.features / DATASET / "train" / "image-dinov2.h5"
    refused(tail_overrides(world, image="tail", image_tag="dinov2"), str(last),
            "written at the backbone's last layer", "--layer K")
    refused(tail_overrides(world, image="cache", text="cache") + ["optim.lr_mult.text_source=0.1"],
            "text_source", "match no parameter")

    changed = copy_backbones(world, tmp_path / "changed")      # weights edited after extraction
    changed.extract("--layer", LAYER, "--text-layer", LAYER, "--tag", f"dinov2_l{LAYER}",
                    "--text-tag", f"bert_l{LAYER}", "--split", "train,dev")
    from transformers import BertModel
    bert = BertModel.from_pretrained(changed.models["bert"], add_pooling_layer=False)
    with torch.no_grad():
        bert.encoder.layer[0].output.dense.bias.add_(0.01)
    bert.save_pretrained(changed.models["bert"])
    refused(tail_overrides(changed, text="tail"),
            str(changed.features / DATASET / "train" / f"text-bert_l{LAYER}.h5"),
            "changed since extraction")

    synthetic = write_dataset(tmp_path / "synthetic", train=20, dev=10, test=10, layer=1)
    refused(config_overrides(synthetic, epochs=1, batch_size=20) + ["data.image_source=tail"],
            "train/image-synimg.h5", "tail not supported for this backbone yet",
            "encoder 'synthetic'")


def test_a_tail_checkpoint_needs_its_tuned_weights_and_backbone(world: TailWorld,
                                                                tmp_path: Path) -> None:
    own = copy_backbones(world, tmp_path)
    own.extract("--layer", LAYER, "--text-layer", LAYER, "--tag", f"dinov2_l{LAYER}",
                "--text-tag", f"bert_l{LAYER}")
    run = tmp_path / "run"
    train(load_config(None, tail_overrides(own, text="tail", epochs=1)), run,
          show_progress=False)
    state = load_checkpoint(run / "best.pt")
    without = {**state, "sources": {}}
    with pytest.raises(InputError, match=r"best\.pt: holds tuned source weights of no side, this "
                                         r"model tunes \['text'\]"):
        create_model(without, *split_caches(own, "test"))
    for path in own.models["bert"].iterdir():
        path.unlink()
    code, message = run_cli("eval", "--checkpoint", run / "best.pt", "--device", "cpu")
    assert code == 2, message
    assert f"test/text-bert_l{LAYER}.h5: cannot load the backbone" in message


def test_a_model_offers_its_heads_scoring_interface() -> None:
    from heads.base import FeatureSpec
    from heads.registry import build_head

    head = build_head("tgdt", FeatureSpec("image", 8, prefix_tokens=1),
                      FeatureSpec("text", 6, prefix_tokens=1, suffix_tokens=1), embed_dim=8)
    model = RetrievalModel(head)
    assert (model.name, model.mode, model.score_kind) == ("tgdt", None, head.score_kind)
    assert model.set_mode("global") is model and head.mode == "global"
    assert model.score_kind == "embedding"
    model.mode = None                          # what train.evaluate restores
    assert head.mode is None and model.tuned_sides() == [] and model.tuned_states() == {}
    with pytest.raises(InputError, match="no inference mode 'nope'"):
        model.set_mode("nope")


def test_a_cnn_tail_gives_the_last_layers_tokens_to_the_head(world: TailWorld,
                                                             tmp_path: Path) -> None:
    """A timm CNN cached at stage 1: the head is built for the tail's output (the last stage's
    grid and width, not the cache's), trains through ``cli train-head`` and ``cli eval`` reads
    the run back through its tuned stages."""
    import timm
    from timm.models import save_for_hf

    torch.manual_seed(2)
    save_for_hf(timm.create_model("test_resnet"), tmp_path / "resnet", safe_serialization=True)
    features = tmp_path / "features"
    code, output = run_cli(
        "extract", "--backbone", "timm", "--weights", tmp_path / "resnet", "--layer", 1,
        "--resolution", 32, "--tag", "resnet_l1", "--dataset", DATASET, "--data-path",
        world.data, "--images", world.data / "images", "--out", features, "--device", "cpu",
        "--workers", 0)
    assert code == 0, output
    for split in ("train", "dev", "test"):
        text = world.features / DATASET / split / "text-bert.h5"
        (features / DATASET / split / text.name).symlink_to(text)
    cached = ImageCache(features / DATASET / "train" / "image-resnet_l1.h5").attrs
    sets = [s for s in tail_overrides(world, "tail", "cache", image_tag="resnet_l1",
                                      text_tag="bert", epochs=1)
            if not s.startswith("data.features=")] + [f"data.features={features}"]
    run = tmp_path / "run"
    code, output = train_cli(run, sets)
    assert code == 0, output
    state = load_checkpoint(run / "best.pt")
    spec = state["image_spec"]
    assert (spec["dim"], tuple(spec["grid"])) != (cached.dim, tuple(cached.grid))
    assert spec["num_tokens"] == 1 + spec["grid"][0] * spec["grid"][1]   # the mean, the grid
    images, texts = (ImageCache(features / DATASET / "test" / "image-resnet_l1.h5"),
                     TextCache(features / DATASET / "test" / "text-bert.h5"))
    model = create_model(state, images, texts)
    assert model.head.image_spec.dim == spec["dim"]
    code, output = run_cli("eval", "--checkpoint", run / "best.pt", "--split", "test")
    assert code == 0 and "rsum" in output, output


def test_a_tail_trains_on_another_view_each_epoch_and_eval_reads_the_centre_view(
        world: TailWorld, tmp_path: Path) -> None:
    """``cli extract --views 3`` at layer K: the train split holds 3 views, dev the centre view;
    the tail reads another view of each photo each epoch, the run records the views, and eval
    of the train split reads the centre view and says so."""
    tag = f"dinov2_l{LAYER}_v3"
    world.extract("--layer", LAYER, "--text-layer", LAYER, "--tag", tag, "--text-tag",
                  f"bert_l{LAYER}", "--views", 3, "--split", "train,dev", out=tmp_path / "features")
    for split in ("train", "dev"):                     # the text caches of the world
        text = world.features / DATASET / split / f"text-bert_l{LAYER}.h5"
        target = tmp_path / "features" / DATASET / split / text.name
        target.unlink()
        target.symlink_to(text)
    sets = [s for s in tail_overrides(world, "tail", image_tag=tag)
            if not s.startswith("data.features=")] + [f"data.features={tmp_path / 'features'}"]
    trainer = Trainer(load_config(None, sets), tmp_path / "run", show_progress=False)
    assert trainer.train_images.num_views == 3 and trainer.dev_images.num_views == 1
    assert isinstance(trainer.model.image_source, TailTokens)
    rows = np.arange(0, 400, 5)                        # caption 0 of each of the 80 photos
    photos = np.asarray(trainer.train_texts.image_index)[rows]
    epochs = [trainer.dataset[(epoch, rows)][0].tokens for epoch in range(3)]
    views = np.stack([view_of(trainer.config["run"]["seed"], epoch, photos, 3)
                      for epoch in range(3)])
    assert (np.sort(views, axis=0) == np.arange(3)[:, None]).all()   # every view once in 3
    for epoch, tokens in enumerate(epochs):
        expected, _ = trainer.train_images.read_views(photos, views[epoch])
        assert torch.equal(tokens, torch.from_numpy(expected).float())
    for a, b in ((0, 1), (1, 2), (0, 2)):
        assert not torch.equal(epochs[a], epochs[b])

    run = tmp_path / "cli-run"
    code, output = train_cli(run, sets)
    assert code == 0, output
    assert "holds 3 views per photo; training reads another one of each photo every epoch" in output
    assert load_checkpoint(run / "best.pt")["image_views"] == 3
    code, output = run_cli("eval", "--checkpoint", run / "best.pt", "--split", "train",
                           "--device", "cpu")
    assert code == 0, output
    assert "holds 3 views per photo; eval reads the centre view (view 0) only" in output
