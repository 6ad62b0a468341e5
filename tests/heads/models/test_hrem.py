"""HREM head: encoders against a naive per-item computation, padding invariance, inference = cosine
of the embeddings with the graph unused, the graph's cross scores against a naive loop, the DWS
triplet loss, learning on synthetic data (gradients: test_contract.py)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cache.batch import TokenBatch
from cache.errors import InputError
from heads.base import Progress
from heads.models.hrem import HremHead, dws_triplet_loss
from heads.losses import HingeLoss, InfoNCELoss
from tests.heads.synthetic_pairs import SyntheticWorld, pad_sets, repad, train_and_recall

CONFIGS = Path(__file__).resolve().parents[3] / "configs"


def make_head(world: SyntheticWorld, **options) -> HremHead:
    options = {"embed_dim": 32, "heads": 4, "graph_warmup_steps": 0, **options}
    return HremHead(world.image_spec, world.text_spec, **options)


def naive_embedding(encoder, tokens: torch.Tensor, pooling: str) -> torch.Tensor:
    """One item, valid tokens only (eval mode): 0.8 * pool + 0.2 * mean(transformer), L2; pool =
    mean of the two largest values per channel, or the mean."""
    valid = torch.ones(1, len(tokens), dtype=torch.bool)
    fragments = encoder.projection(tokens.unsqueeze(0), valid)[0]
    k = min(2, len(fragments)) if pooling == "max2" else len(fragments)
    pooled = fragments.topk(k, dim=0).values.mean(0)
    related = encoder.relation.layers[0](fragments.unsqueeze(0))[0].mean(0)
    return F.normalize(0.8 * pooled + 0.2 * related, dim=-1)


@pytest.mark.parametrize("pooling", ["max2", "mean"])
def test_embeddings_match_naive_per_item_and_ignore_padding(pooling):
    world = SyntheticWorld(seed=0)
    images, texts, _ = world.sample(4, 2)
    head = make_head(world, pooling=pooling).eval()
    with torch.no_grad():
        head.image_encoder.projection.bn.running_mean.normal_(0, 0.5)
        img, txt = head.encode_images(images)["emb"], head.encode_texts(texts)["emb"]
        for enc, batch, emb in ((head.image_encoder, images, img), (head.text_encoder, texts, txt)):
            for row in range(len(batch)):
                want = naive_embedding(enc, batch.tokens[row][batch.mask[row]], pooling)
                torch.testing.assert_close(emb[row], want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(head.encode_images(repad(images, 4, seed=1))["emb"], img)
        torch.testing.assert_close(head.encode_texts(repad(texts, 6, seed=2))["emb"], txt)


def test_inference_is_the_cosine_of_the_embeddings_and_never_runs_the_graph():
    world = SyntheticWorld(seed=1)
    images, texts, image_of = world.sample(6, 1)
    head = make_head(world, graph_warmup_steps=5)
    calls = []
    head.graph.register_forward_hook(lambda *args: calls.append(1))
    head.eval()
    with torch.no_grad():
        img, txt = head.encode_images(images), head.encode_texts(texts)
        scores = head.score(img, txt)
    assert torch.equal(scores, img["emb"] @ txt["emb"].t())
    assert torch.allclose(img["emb"].norm(dim=-1), torch.ones(6))
    assert set(img) == {"emb"} and not calls
    head.train()
    criterion = HingeLoss()
    _, logs = head.training_loss(images, texts, image_of, criterion, Progress(0, 4, 10))
    assert not calls and "graph" not in logs                      # still warming up
    _, logs = head.training_loss(images, texts, image_of, criterion, Progress(0, 5, 10))
    assert calls == [1] and {"base", "graph", "reg"} <= set(logs)


def naive_cross(regions: TokenBatch, words: TokenBatch, k: int):
    """SCAN-style t2i / i2t scores and top-k features by a loop over (caption, image) pairs."""
    n_t, n_i = len(words), len(regions)
    t2i_mean, i2t_mean = torch.zeros(n_t, n_i), torch.zeros(n_i, n_t)
    t2i_top, i2t_top = torch.zeros(n_t, n_i, k), torch.zeros(n_i, n_t, k)
    for t in range(n_t):
        w = F.normalize(words.tokens[t][words.mask[t]], dim=-1)
        for i in range(n_i):
            r = F.normalize(regions.tokens[i][regions.mask[i]], dim=-1)
            a = F.leaky_relu(w @ r.t(), 0.1)
            per_word = F.normalize(a, dim=0).max(dim=1).values
            per_region = F.normalize(a, dim=1).max(dim=0).values
            t2i_mean[t, i], i2t_mean[i, t] = per_word.mean(), per_region.mean()
            top = per_word.topk(min(k, len(per_word))).values
            t2i_top[t, i, :len(top)] = top
            top = per_region.topk(min(k, len(per_region))).values
            i2t_top[i, t, :len(top)] = top
    return t2i_mean, t2i_top, i2t_mean, i2t_top


def test_graph_cross_scores_match_a_naive_loop_and_skip_padding():
    world = SyntheticWorld(seed=2)
    head = make_head(world, relevance_topk=5)
    g = torch.Generator().manual_seed(3)
    regions = pad_sets([torch.randn(n, 8, generator=g) for n in (7, 4, 9)], generator=g)
    words = pad_sets([torch.randn(n, 8, generator=g) for n in (3, 8, 6, 2)], generator=g)
    got = head.graph.cross_scores(regions.tokens, regions.mask, words.tokens, words.mask)
    for g, w in zip(got, naive_cross(regions, words, 5)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_dws_triplet_loss_by_hand():
    # three pairs with distinct images; from each anchor exactly one negative lies within the
    # cut-off distance (s > 1 - 1.7^2/2 = -0.445), so the sampling is deterministic
    s = torch.tensor([[0.5, 0.4, -0.9],
                      [-0.9, 0.6, 0.5],
                      [0.45, -0.9, 0.3]])
    ids = torch.tensor([0, 1, 2])
    i2t = (0.2 + 0.4 - 0.5) + (0.2 + 0.5 - 0.6) + (0.2 + 0.45 - 0.3)      # anchors: images (rows)
    t2i = (0.2 + 0.45 - 0.5) + max(0.0, 0.2 + 0.4 - 0.6) + (0.2 + 0.5 - 0.3)  # anchors: captions
    torch.testing.assert_close(dws_triplet_loss(s, ids), torch.tensor(i2t + t2i))
    # a row without any candidate negative contributes nothing (and nothing fails)
    far = torch.tensor([[0.9, -0.99], [-0.99, 0.9]])
    assert float(dws_triplet_loss(far, torch.tensor([0, 1]))) == 0.0


def test_criterion_base_loss_is_the_run_loss_on_all_four_graph_terms():
    """base_loss="criterion" applies the run's loss (here InfoNCE) to L(V,T), L(V,T'), L(V',T),
    L(V',T'): its learnable temperature gets a gradient and the total exceeds the plain term."""
    world = SyntheticWorld(seed=4)
    images, texts, image_of = world.sample(8, 1)
    head = make_head(world, base_loss="criterion").train()
    criterion = InfoNCELoss()
    loss, logs = head.training_loss(images, texts, image_of, criterion, Progress(1, 10, 10))
    loss.backward()
    assert criterion.log_scale.grad is not None and criterion.log_scale.grad.abs() > 0
    assert float(logs["base"]) > 0 and float(loss.detach()) > float(logs["base"])


def test_bad_options():
    world = SyntheticWorld()
    with pytest.raises(InputError, match="base_loss"):
        make_head(world, base_loss="trip")
    with pytest.raises(InputError, match="divisible"):
        make_head(world, embed_dim=30)
    with pytest.raises(InputError, match="pooling must be one of"):
        make_head(world, pooling="max3")


def test_learns_synthetic_structured_data_with_the_graph():
    torch.manual_seed(0)
    world = SyntheticWorld(seed=5)
    head = make_head(world, graph_warmup_steps=50, dropout=0.0)
    r1 = train_and_recall(head, HingeLoss(hardest_after_epochs=0), world, steps=100, batch_size=32,
                          lr=3e-3)
    assert r1 > 0.4, r1          # chance is 0.01
