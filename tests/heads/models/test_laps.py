"""LAPS head: sizes from the cache, block scoring against a naive per-pair loop, padding invariance
(also for region caches), the score-network option, learning on synthetic data. What every head
must do (gradients, modes, checkpoints) is in test_contract.py."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cache.batch import TokenBatch
from cache.errors import CacheMismatchError, InputError
from heads.layers import patch_slimming
from heads.base import FeatureSpec, Progress, index_encoded
from heads.models.laps import LapsHead
from heads.losses import HingeLoss
from tests.heads.patch_world import GridWorld, naive_max_mean, naive_slimmed_set
from tests.heads.synthetic_pairs import SyntheticWorld, repad, train_and_recall

CONFIGS = Path(__file__).resolve().parents[3] / "configs"
TEXT = FeatureSpec("text", 12, encoder="synthetic")


def image_spec(grid=(4, 4), prefix=1, dim=16, suffix=0) -> FeatureSpec:
    return FeatureSpec("image", dim, encoder="synthetic", prefix_tokens=prefix,
                       suffix_tokens=suffix,
                       num_tokens=prefix + grid[0] * grid[1] + suffix, grid=grid)


def make_data(seed: int = 0, n_images: int = 4, captions: int = 2, grid=(4, 4)):
    world = GridWorld(seed=seed, grid=grid)
    images, texts, image_of = world.sample(n_images, captions)
    return world, images.to("cpu", torch.float64), texts.to("cpu", torch.float64), image_of


def naive_laps_scores(head: LapsHead, images: TokenBatch, texts: TokenBatch) -> torch.Tensor:
    """Per-pair loop over valid tokens only, following the paper's steps."""
    out = torch.zeros(len(images), len(texts), dtype=torch.float64)
    for i in range(len(images)):
        tokens = head.vision_proj(images.tokens[i][images.mask[i]])
        cls = tokens[0] if head.num_prefix else None
        patches = tokens[head.patch_start:head.patch_start + head.num_patches]
        for t in range(len(texts)):
            words = head.text_proj(texts.tokens[t][texts.mask[t]])
            keep_prob = None
            if head.slimming.score_net is not None:
                keep_prob = head.slimming.score_net(patches)[:, 0].exp()
            visual = naive_slimmed_set(head, cls, patches, words, keep_prob=keep_prob)
            out[i, t] = naive_max_mean(words, visual)
    return out


# ----------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("spec, rho, kappa, expected", [
    (image_spec((14, 14), 1, 768), 0.5, 0.4, (196, 98, 39, 1)),    # ViT-B/16: CLS + 39 + fused
    (image_spec((7, 7), 0, 1024), 0.8, 0.6, (49, 40, 23, 0)),      # Swin-B: no CLS
    (image_spec((16, 16), 1, 768), 0.8, 0.6, (256, 205, 122, 1)),  # DINOv2-B/14 at 224
    (image_spec((16, 16), 5, 768), 0.8, 0.6, (256, 205, 122, 1)),  # with 4 registers: CLS only
    (FeatureSpec("image", 2048, num_tokens=36), 0.5, 0.4, (36, 18, 7, 0)),  # regions, no grid
])
def test_sizes_come_from_the_cache(spec, rho, kappa, expected):
    head = LapsHead(spec, TEXT, embed_dim=32, keep_ratio=rho, aggr_ratio=kappa)
    n, k, m, prefix = expected
    assert (head.num_patches, head.slimming.num_keep, head.slimming.num_aggregated,
            head.num_prefix) == (n, k, m, prefix)


def test_bad_options_and_inconsistent_cache():
    with pytest.raises(InputError, match="keep_ratio"):
        LapsHead(image_spec(), TEXT, keep_ratio=0.0)
    with pytest.raises(InputError, match="no aggregated token"):
        LapsHead(image_spec((2, 2)), TEXT, keep_ratio=0.5, aggr_ratio=0.4)
    bad = FeatureSpec("image", 16, num_tokens=20, prefix_tokens=1, grid=(4, 4), source="x.h5")
    with pytest.raises(CacheMismatchError, match="x.h5"):
        LapsHead(bad, TEXT)


# ----------------------------------------------------------------------------- scoring


@pytest.mark.parametrize("via_gram", [False, True])
@pytest.mark.parametrize("options", [{}, {"score_net": True}])
def test_block_score_matches_naive_per_pair_loop(monkeypatch, options, via_gram):
    monkeypatch.setattr(patch_slimming, "gram_is_cheaper", lambda *sizes: via_gram)
    world, images, texts, _ = make_data(n_images=3)
    head = LapsHead(world.image_spec, world.text_spec, embed_dim=24, keep_ratio=0.5,
                    aggr_ratio=0.5, chunk_elements=1, **options).double().eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in head.parameters():               # make the learned parts non-trivial
            p.add_(0.3 * torch.randn_like(p))
        got = head.score(head.encode_images(images), head.encode_texts(texts))
        want = naive_laps_scores(head, images, texts)
    assert head.caption_chunk(len(images), texts.tokens.shape[1]) == 1  # one caption per step
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)  # eps conventions


def test_no_prefix_cache_matches_naive_loop():
    """A Swin-like cache (grid, no CLS): the visual set is [aggregated; fused] only."""
    world, images, texts, _ = make_data(seed=3, n_images=3)
    spec = image_spec((4, 4), prefix=0, dim=world.image_spec.dim)
    images = TokenBatch(images.tokens[:, 1:], images.mask[:, 1:])
    head = LapsHead(spec, world.text_spec, embed_dim=16, keep_ratio=0.5).double().eval()
    assert head.num_prefix == 0
    with torch.no_grad():
        img, txt = head.encode_images(images), head.encode_texts(texts)
        block = head.score(img, txt)
        want = naive_laps_scores(head, images, texts)
        rows_i = torch.arange(len(images)).repeat_interleave(len(texts))
        rows_t = torch.arange(len(texts)).repeat(len(images))
        pairs = head.score_pairs(index_encoded(img, rows_i), index_encoded(txt, rows_t))
    torch.testing.assert_close(block, want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(pairs.view_as(block), block, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("via_gram", [False, True])
def test_chunking_and_score_pairs_agree_with_the_block(monkeypatch, via_gram):
    monkeypatch.setattr(patch_slimming, "gram_is_cheaper", lambda *sizes: via_gram)
    world, images, texts, _ = make_data(seed=1, n_images=4, captions=2)
    head = LapsHead(world.image_spec, world.text_spec, embed_dim=24).double().eval()
    with torch.no_grad():
        img, txt = head.encode_images(images), head.encode_texts(texts)
        block = head.score(img, txt)
        head.chunk_elements = 1
        torch.testing.assert_close(head.score(img, txt), block, rtol=1e-12, atol=1e-12)
        rows_i = torch.arange(len(images)).repeat_interleave(len(texts))
        rows_t = torch.arange(len(texts)).repeat(len(images))
        pairs = head.score_pairs(index_encoded(img, rows_i), index_encoded(txt, rows_t))
    torch.testing.assert_close(pairs.view(len(images), len(texts)), block, rtol=1e-10, atol=1e-10)


def test_caption_padding_does_not_change_scores():
    world, images, texts, _ = make_data(seed=2)
    head = LapsHead(world.image_spec, world.text_spec, embed_dim=24).double().eval()
    with torch.no_grad():
        img = head.encode_images(images)
        base = head.score(img, head.encode_texts(texts))
        wider = repad(TokenBatch(texts.tokens.float(), texts.mask), extra=7, seed=3).to(
            "cpu", torch.float64)
        assert wider.tokens.shape[1] == texts.tokens.shape[1] + 7
        torch.testing.assert_close(head.score(img, head.encode_texts(wider)), base,
                                   rtol=1e-12, atol=1e-12)
        head.chunk_elements = 1        # chunks of one caption, each trimmed to its own length
        torch.testing.assert_close(head.score(img, head.encode_texts(wider)), base,
                                   rtol=1e-12, atol=1e-12)


def test_region_padding_does_not_change_scores():
    """Without a grid (region caches) images have different lengths; padding never counts."""
    world = SyntheticWorld(seed=4)
    images, texts, _ = world.sample(5, 2)
    spec = FeatureSpec("image", world.img_basis.shape[1], num_tokens=12, prefix_tokens=1)
    head = LapsHead(spec, world.text_spec, embed_dim=16, keep_ratio=0.5, aggr_ratio=0.4).eval()
    with torch.no_grad():
        base = head.score(head.encode_images(images), head.encode_texts(texts))
        wider = head.score(head.encode_images(repad(images, extra=3, seed=5)),
                           head.encode_texts(repad(texts, extra=2, seed=6)))
    torch.testing.assert_close(wider, base, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("options", [{}, {"score_net": True}])
def test_ratio_loss_is_logged_with_the_score_network_only(options):
    world, images, texts, image_of = make_data(seed=5, n_images=6, captions=1)
    head = LapsHead(world.image_spec, world.text_spec, embed_dim=24, **options).double().train()
    _, logs = head.training_loss(images, texts, image_of, HingeLoss(hardest_after_epochs=None),
                                 Progress(epoch=0, step=0, steps_per_epoch=10))
    assert ("ratio" in logs) == options.get("score_net", False)


def test_score_net_training_is_stochastic_and_eval_is_not():
    world, images, texts, _ = make_data(seed=6)
    head = LapsHead(world.image_spec, world.text_spec, embed_dim=24, score_net=True,
                    gumbel_tau=0.5).double()
    with torch.no_grad():
        head.eval()
        img, txt = head.encode_images(images), head.encode_texts(texts)
        assert torch.equal(head.select(img, txt), head.select(img, txt))
        head.train()
        picks = [head.select(img, txt) for _ in range(5)]
    assert any(not torch.equal(picks[0], p) for p in picks[1:])
    assert all(int(p.sum(-1).unique().numel()) == 1 for p in picks)    # always exactly K kept


def test_learns_synthetic_structured_data():
    torch.manual_seed(0)
    world = GridWorld(seed=7)
    head = LapsHead(world.image_spec, world.text_spec, embed_dim=32, keep_ratio=0.5, aggr_ratio=0.5)
    r1 = train_and_recall(head, HingeLoss(hardest_after_epochs=0), world, steps=100, batch_size=32,
                          lr=1e-2)
    assert r1 > 0.4, r1          # chance is 0.01; 0.66-0.75 over three seeds


# ----------------------------------------------------------------------------- registry, configs


def test_explain_exposes_the_selection_and_fusion_of_each_pair():
    """The picture hook: per caption x image, the paper's s_j = a_j + b_j, its top-K and the
    fusion softmax over the dropped patches; the score is the same with or without it."""
    world, images, texts, _ = make_data(n_images=3)
    head = LapsHead(world.image_spec, world.text_spec, embed_dim=24, keep_ratio=0.5,
                    aggr_ratio=0.5).double().eval()
    with torch.no_grad():
        img, txt = head.encode_images(images), head.encode_texts(texts)
        before = head.score(img, txt)
        out = head.explain(img, txt)
        assert torch.equal(out["keep"], head.select(img, txt))
        assert torch.equal(head.score(img, txt), before)
        for i in range(len(images)):
            tokens = head.vision_proj(images.tokens[i][images.mask[i]])
            patches = tokens[head.patch_start:head.patch_start + head.num_patches]
            for t in range(len(texts)):
                words = head.text_proj(texts.tokens[t][texts.mask[t]])
                s = (torch.nn.functional.cosine_similarity(patches, patches.mean(0), dim=-1)
                     + torch.nn.functional.cosine_similarity(patches, words.mean(0), dim=-1))
                torch.testing.assert_close(out["scores"][t, i], s)
                keep = out["keep"][t, i]
                assert int(keep.sum()) == head.slimming.num_keep
                assert s[keep].min() >= s[~keep].max()
                torch.testing.assert_close(out["fuse"][t, i][~keep], torch.softmax(s[~keep], 0))
                assert not out["fuse"][t, i][keep].any()
