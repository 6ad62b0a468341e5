"""TGDT head: token-drop rule and MrSw against naive loops, padding invariance of both branches,
the consistency loss, every loss key, the detach option, inference modes, and learning."""
from __future__ import annotations

import pytest
import torch

from cache.batch import TokenBatch
from cache.errors import InputError
from heads.base import FeatureSpec, Progress
from heads.layers import l2norm, masked_mean
from heads.losses import HingeLoss
from heads.models.tgdt import TGDTHead, consistency_loss
from heads.registry import build_head, head_options
from tests.heads.synthetic_pairs import repad
from tests.heads.token_family_data import FramedWorld, recall_at_1, sample, train_head

SMALL = dict(embed_dim=16, ff_dim=32, local_layers=1, global_layers=1, heads=2, dropout=0.0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world() -> FramedWorld:
    return FramedWorld(seed=3)


def make_head(world: FramedWorld, seed: int = 0, **options) -> TGDTHead:
    torch.manual_seed(seed)
    return build_head("tgdt", world.image_spec, world.text_spec, **{**SMALL, **options})


def one_item(batch: TokenBatch, row: int) -> TokenBatch:
    """Row ``row`` alone, without any padding."""
    n = int(batch.mask[row].sum())
    return TokenBatch(batch.tokens[row:row + 1, :n], batch.mask[row:row + 1, :n])


@pytest.mark.parametrize("drop_tokens, word_drop", [("cls_sep", (1, 1)), ("teran", (1, 2))])
def test_local_score_matches_naive_mrsw_loop(world, drop_tokens, word_drop):
    head = make_head(world, drop_tokens=drop_tokens).eval()
    split = sample(world, 5)
    with torch.no_grad():
        scores = head.score(head.encode_images(split.images), head.encode_texts(split.texts))
        regions = []
        for i in range(len(split.images)):
            local, _ = head.image(one_item(split.images, i), False)
            regions.append(l2norm(local[0, 1:]))                     # image CLS dropped
        naive = torch.zeros(len(regions), len(split.caption_image))
        for j in range(len(split.caption_image)):
            local, _ = head.text(one_item(split.texts, j), False)
            first, last = word_drop
            words = l2norm(local[0, first:local.shape[1] - last])
            for i, r in enumerate(regions):
                naive[i, j] = 10.0 * sum(max(float(w @ v) for v in r) for w in words)
    assert torch.allclose(scores, naive, atol=1e-4)


def test_teran_rule_drops_the_last_word_piece(world):
    head = make_head(world).eval()
    split = sample(world, 2)
    with torch.no_grad():
        default = head.encode_texts(split.texts)["mask"].sum(1)
        head.drop_tokens = "teran"
        teran = head.encode_texts(split.texts)["mask"].sum(1)
    lengths = split.texts.mask.sum(1)
    assert torch.equal(default, lengths - 2) and torch.equal(teran, lengths - 3)


@pytest.mark.parametrize("side", ["image", "text"])
def test_both_branches_ignore_batch_padding(world, side):
    """The released TGDT global encoders attend to padding; here the encodings must not change
    when the batch carries more (garbage) padding."""
    head = make_head(world, global_layers=2).eval()
    split = sample(world, 4)
    batch = split.images if side == "image" else split.texts
    encode = head.encode_images if side == "image" else head.encode_texts
    with torch.no_grad():
        plain = encode(batch)
        padded = encode(repad(batch, extra=9, seed=5))
        alone = encode(one_item(batch, 1))
    assert torch.allclose(plain["emb"], padded["emb"], atol=1e-5)
    assert torch.allclose(plain["emb"][1], alone["emb"][0], atol=1e-5)
    width = plain["tokens"].shape[1]
    assert torch.allclose(plain["tokens"], padded["tokens"][:, :width], atol=1e-5)
    assert not padded["mask"][:, width:].any()


def test_global_vector_is_the_cls_output_or_the_mean_without_prefix(world):
    no_prefix = FeatureSpec("image", world.image_spec.dim, encoder="synthetic", prefix_tokens=0)
    torch.manual_seed(0)
    head = TGDTHead(no_prefix, world.text_spec, **SMALL).eval()
    split = sample(world, 3)
    with torch.no_grad():
        local, emb = head.image(split.images, False)
        tokens = head.image.glob(local, split.images.mask)
        assert torch.allclose(emb, l2norm(masked_mean(tokens, split.images.mask)), atol=1e-6)
        local, emb = head.text(split.texts, False)
        assert torch.allclose(emb, l2norm(head.text.glob(local, split.texts.mask)[:, 0]), atol=1e-6)


def test_consistency_loss_matches_naive_loop():
    g = torch.Generator().manual_seed(0)
    img = l2norm(torch.randn(6, 8, generator=g))
    txt = l2norm(torch.randn(6, 8, generator=g))
    expected = 0.0
    for j in range(6):
        worst = max(abs(float(txt[i] @ txt[j]) - float(img[i] @ img[j])) for i in range(6))
        expected += max(worst - 0.3, 0.0)
    assert consistency_loss(img, txt, 0.3).item() == pytest.approx(expected, rel=1e-5)
    assert consistency_loss(img, txt, 0.3, "mean").item() == pytest.approx(expected / 6, rel=1e-5)


def _loss(world, batch, **options):
    head = make_head(world, **options).train()
    criterion = HingeLoss(margin=0.2, hardest_after_epochs=0)
    return head.training_loss(*batch, criterion, Progress())


@pytest.mark.parametrize("key, value", [("global_weight", 2.0), ("consistency_weight", 2.0),
                                        ("alignment_weight", 2.0), ("consistency_margin", 0.0),
                                        ("alignment_scale", 5.0), ("word_pool", "mean"),
                                        ("consistency_reduction", "mean")])
def test_every_loss_key_changes_the_loss(world, key, value):
    split = sample(world, 16)
    batch = split.batch(torch.arange(0, 32, 2))
    base = {"consistency_margin": 0.05}
    loss, logs = _loss(world, batch, **base)
    changed, changed_logs = _loss(world, batch, **{**base, key: value})
    assert not torch.isclose(loss, changed)
    if key.endswith("_weight"):
        term = key[:-len("_weight")]
        assert torch.isclose(changed_logs[term], value * logs[term])
        assert torch.isclose(loss, sum(logs[t] for t in ("global", "consistency", "alignment")))


def test_a_zero_weight_removes_its_term_and_all_zero_is_an_error(world):
    split = sample(world, 8)
    _, logs = _loss(world, split.batch(torch.arange(8)), alignment_weight=0.0)
    assert "alignment" not in logs and {"global", "consistency"} <= set(logs)
    with pytest.raises(InputError, match="all zero"):
        make_head(world, global_weight=0, consistency_weight=0, alignment_weight=0)


@pytest.mark.parametrize("detach", [True, False])
def test_detach_global_input_keeps_global_losses_off_the_local_layers(world, detach):
    split = sample(world, 8)
    head = make_head(world, alignment_weight=0.0, detach_global_input=detach,
                     consistency_margin=0.0).train()
    loss, _ = head.training_loss(*split.batch(torch.arange(16)),
                                 HingeLoss(margin=0.2, hardest_after_epochs=0), Progress())
    loss.backward()
    local_grad = head.image.proj.weight.grad
    assert head.image.glob.layers[0].linear1.weight.grad.abs().sum() > 0
    assert (local_grad is None or local_grad.abs().sum() == 0) == detach


def test_options_are_registered_and_checked(world):
    options = head_options("tgdt")
    for key in ("drop_tokens", "detach_global_input", "global_weight", "consistency_weight",
                "alignment_weight", "consistency_margin", "alignment_scale"):
        assert key in options
    with pytest.raises(InputError, match="drop_tokens"):
        make_head(world, drop_tokens="all")
    with pytest.raises(InputError, match="global_pool"):
        make_head(world, global_pool="max")


def test_learns_synthetic_structure_in_both_branches(world):
    head = make_head(world, embed_dim=32, ff_dim=64, heads=4)
    train, test = sample(world, 200), sample(world, 100)
    chance = {m: recall_at_1(head, test, m) for m in ("global", "local")}
    losses = train_head(head, train, steps=100)
    assert losses[-1] < losses[0] / 4
    for mode, floor in (("global", 12.0), ("local", 40.0)):     # chance is 1 %
        r1 = recall_at_1(head, test, mode)
        assert min(r1.values()) > floor, (mode, r1, chance[mode])


def test_config_trains_through_the_trainer(tmp_path):
    """configs/f8k_tgdt.yaml on tiny synthetic caches: every loss term is logged and the dev
    selection (local branch) ends far above chance (5 %)."""
    from train.config import load_config
    from train.trainer import train
    from tests.heads.synthetic_caches import config_overrides, write_dataset

    features = write_dataset(tmp_path / "features", train=80, dev=20, test=10)
    config = load_config("configs/f8k_tgdt.yaml", config_overrides(
        features, head=None, epochs=3, batch_size=40, lr=0.003, warmup_steps=0,
        milestones="[]") + ["head.embed_dim=32", "head.ff_dim=64", "head.dropout=0.0"])
    summary = train(config, tmp_path / "run", show_progress=False)
    assert {"global", "consistency", "alignment"} <= summary.history[-1]["scalars"].keys()
    dev = summary.history[-1]["dev"]
    assert dev["t2i_r1"] > 25 and dev["i2t_r1"] > 25, dev
