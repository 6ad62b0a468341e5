"""The SCAN t2i head against a direct per-pair implementation of the paper's steps."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cache.errors import InputError
from heads.registry import build_head, head_options
from heads.base import index_encoded
from heads.losses import InfoNCELoss
from tests.heads.synthetic_pairs import SyntheticWorld, train_and_recall


def scan_direct(words: torch.Tensor, regions: torch.Tensor, pooling: str, lambda_softmax: float = 9.0,
                lambda_lse: float = 6.0) -> float:
    """One pair, valid tokens only, following Lee et al. 2018 step by step (attended vectors built)."""
    s = regions @ words.t()                                        # [R, W] cosines
    s = F.leaky_relu(s, 0.1)
    s = s / (s.norm(dim=1, keepdim=True) + 1e-8)                   # normalise over words
    alpha = torch.softmax(lambda_softmax * s.t(), dim=1)           # [W, R] over regions
    attended = alpha @ regions                                     # [W, C]
    relevance = [float(F.cosine_similarity(words[w], attended[w], dim=0, eps=1e-8))
                 for w in range(words.shape[0])]
    if pooling == "lse":
        return math.log(sum(math.exp(lambda_lse * r) for r in relevance)) / lambda_lse
    return sum(relevance) / len(relevance)


def _head(world: SyntheticWorld, **options):
    return build_head("scan", world.image_spec, world.text_spec, embed_dim=8, **options)


def test_options() -> None:
    assert head_options("scan") == {"embed_dim": 1024, "pooling": "lse", "lambda_softmax": 9.0,
                                    "lambda_lse": 6.0, "negative_slope": 0.1, "use_prefix": True,
                                    "chunk_elements": 2 ** 24}
    with pytest.raises(InputError, match="pooling"):
        _head(SyntheticWorld(), pooling="max")


@pytest.mark.parametrize("pooling", ["lse", "avg"])
def test_block_score_matches_direct_formula_and_pairs(pooling: str) -> None:
    world = SyntheticWorld(seed=1)
    head = _head(world, pooling=pooling)
    images, texts, _ = world.sample(5)
    with torch.no_grad():
        img, txt = head.encode_images(images), head.encode_texts(texts)
        block = head.score(img, txt)
        for i in range(5):
            for t in range(5):
                direct = scan_direct(txt["tokens"][t][txt["mask"][t]],
                                     img["tokens"][i][img["mask"][i]], pooling)
                assert math.isclose(float(block[i, t]), direct, abs_tol=1e-5)
        rows_i = torch.arange(5).repeat_interleave(5)
        rows_t = torch.arange(5).repeat(5)
        pairs = head.score_pairs(index_encoded(img, rows_i), index_encoded(txt, rows_t))
        assert torch.allclose(pairs.view(5, 5), block, atol=1e-6)
        head.chunk_elements = 1                                    # one image per chunk
        assert torch.allclose(head.score(img, txt), block, atol=1e-6)


def test_use_prefix() -> None:
    world = SyntheticWorld(seed=3)
    images, texts, _ = world.sample(3)
    changed = type(images)(images.tokens.clone(), images.mask)
    changed.tokens[:, 0] += 3.0
    head = _head(world, use_prefix=False)
    with torch.no_grad():
        txt = head.encode_texts(texts)
        assert torch.allclose(head.score(head.encode_images(images), txt),
                              head.score(head.encode_images(changed), txt), atol=1e-6)


def test_learns_synthetic_pairs() -> None:
    world = SyntheticWorld(seed=5)
    head = build_head("scan", world.image_spec, world.text_spec, embed_dim=32)
    recall = train_and_recall(head, InfoNCELoss(), world, steps=150, lr=1e-2)
    assert recall > 0.3, recall                       # chance: 0.01


def test_attention_is_the_alpha_of_the_direct_formula() -> None:
    """The picture hook: word-to-region attention of aligned pairs, as in step 2 of the paper
    over the valid words and regions (rows of valid words sum to 1, padding regions get 0)."""
    world = SyntheticWorld(seed=2)
    head = _head(world)
    images, texts, _ = world.sample(4)
    with torch.no_grad():
        img, txt = head.encode_images(images), head.encode_texts(texts)
        attention = head.attention(img, txt)
        for p in range(4):
            words, regions = txt["tokens"][p][txt["mask"][p]], img["tokens"][p][img["mask"][p]]
            s = F.leaky_relu(regions @ words.t(), 0.1)
            s = s / (s.norm(dim=1, keepdim=True) + 1e-8)
            alpha = torch.softmax(9.0 * s.t(), dim=1)
            got = attention[p][txt["mask"][p]]
            torch.testing.assert_close(got[:, img["mask"][p]], alpha, atol=1e-5, rtol=1e-4)
            assert not got[:, ~img["mask"][p]].any()
