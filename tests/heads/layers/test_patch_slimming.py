"""LAPS patch slimming internals: both exact routes of scoring words against mixtures of patches
(built mixtures, or word x patch products and the Gram matrix) against a naive loop, the route
choice, and float32 norms under autocast."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import heads.layers.patch_slimming as slimming
from heads.layers.patch_slimming import gram_is_cheaper, mixed_norms, mixture_cosines


def random_mixtures(n_cap=3, n_img=4, words=5, patches=6, mixtures=4, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(n_img, patches, dim, generator=g, dtype=torch.float64)
    text = F.normalize(torch.randn(n_cap, words, dim, generator=g, dtype=torch.float64), dim=-1)
    mix = torch.rand(n_cap, n_img, patches, mixtures, generator=g, dtype=torch.float64)
    mix[..., 0] = 0                               # an empty mixture (a fused token with no drop)
    images = {"patches": values, "patch_gram": values @ values.transpose(1, 2)}
    return images, mix, text


def naive_cosines(values, mix, text):
    """cos(word, mixture) one pair at a time: ``[c, I, L, K]``."""
    out = torch.zeros(*mix.shape[:2], text.shape[1], mix.shape[-1], dtype=values.dtype)
    for c in range(mix.shape[0]):
        for i in range(mix.shape[1]):
            built = mix[c, i].t() @ values[i]                              # [K, C]
            out[c, i] = text[c] @ built.t() / (built.norm(dim=-1) + 1e-8)
    return out


@pytest.mark.parametrize("via_gram", [False, True])
def test_both_routes_match_a_naive_loop(monkeypatch, via_gram):
    monkeypatch.setattr(slimming, "gram_is_cheaper", lambda *sizes: via_gram)
    images, mix, text = random_mixtures()
    want = naive_cosines(images["patches"], mix, text)
    torch.testing.assert_close(mixture_cosines(images, mix, text, paired=False), want,
                               rtol=1e-9, atol=1e-9)
    # paired: caption p with image p (three captions against the first three images)
    paired = {k: v[:3] for k, v in images.items()}
    diagonal = torch.stack([mix[p, p] for p in range(3)]).unsqueeze(0)
    got = mixture_cosines(paired, diagonal, text, paired=True)
    torch.testing.assert_close(got[0], torch.stack([want[p, p] for p in range(3)]),
                               rtol=1e-9, atol=1e-9)
    assert torch.all(got[..., 0] == 0)                  # the empty mixture scores 0, not NaN


def test_route_choice_follows_the_multiply_adds():
    # LAPS's ViT setting on a 7 x 7 grid (M + 1 = 10 mixtures): building them is cheaper
    assert not gram_is_cheaper(words=16, patches=49, mixtures=10, dim=256)
    # CADR's setting (M + 1 = 24) and DINOv2-sized grids: the Gram route
    assert gram_is_cheaper(words=16, patches=49, mixtures=24, dim=512)
    assert gram_is_cheaper(words=16, patches=256, mixtures=123, dim=512)


def test_gram_route_gradient_matches_the_built_route(monkeypatch):
    grads = []
    for via_gram in (False, True):
        monkeypatch.setattr(slimming, "gram_is_cheaper", lambda *sizes: via_gram)
        images, mix, text = random_mixtures(seed=1)
        values = images["patches"].requires_grad_(True)
        images["patch_gram"] = values @ values.transpose(1, 2)
        mix.requires_grad_(True)
        mixture_cosines(images, mix, text, paired=False).pow(2).sum().backward()
        grads.append((values.grad, mix.grad))
    for built, via_gram in zip(*grads):
        torch.testing.assert_close(via_gram, built, rtol=1e-8, atol=1e-10)


def test_mixed_norms_are_at_least_float32_under_autocast():
    images, mix, _ = random_mixtures(seed=2)
    want = torch.stack([torch.stack([(mix[c, i].t() @ images["patches"][i]).norm(dim=-1)
                                     for i in range(mix.shape[1])]) for c in range(mix.shape[0])])
    gram, mix32 = images["patch_gram"].float(), mix.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = mixed_norms(gram, mix32)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want + 1e-8, rtol=1e-5, atol=1e-6)
