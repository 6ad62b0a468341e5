"""CAA (CADR) head: the context anchor attention gate against a naive loop, the gate inside the
patch selection (it changes which patches are kept), the refiner option with a padding mask,
learning on synthetic data, configs (gradients into the gate: test_contract.py)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cache.batch import TokenBatch
from cache.errors import CacheMismatchError, InputError
from heads.base import FeatureSpec
from heads.layers import patch_slimming
from heads.losses import HingeLoss
from heads.models.caa import CaaHead, ContextAnchorAttention, anchor_kernel
from heads.models.laps import LapsHead
from train.config import load_config
from tests.heads.patch_world import GridWorld, naive_max_mean, naive_slimmed_set
from tests.heads.synthetic_pairs import repad, train_and_recall

CONFIGS = Path(__file__).resolve().parents[3] / "configs"


def make_data(seed: int = 0, n_images: int = 4, captions: int = 2, grid=(4, 4)):
    world = GridWorld(seed=seed, grid=grid)
    images, texts, image_of = world.sample(n_images, captions)
    return world, images.to("cpu", torch.float64), texts.to("cpu", torch.float64), image_of


def perturb(module: torch.nn.Module, scale: float = 0.3, seed: int = 0) -> None:
    """Move every parameter and BN statistic away from its initial value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
        for name, buf in module.named_buffers():
            if name.endswith("running_mean"):
                buf.add_(0.2 * torch.randn(buf.shape, generator=g, dtype=buf.dtype))
            elif name.endswith("running_var"):
                buf.mul_(1 + torch.rand(buf.shape, generator=g, dtype=buf.dtype))


def naive_gate(caa: ContextAnchorAttention, patches: torch.Tensor) -> torch.Tensor:
    """The CAA gate of one image by explicit loops over grid positions: ``[N, C] -> [N, out]``."""
    (h, w), (k_h, k_w) = caa.grid, caa.kernel
    c = patches.shape[1]
    x = patches.t().reshape(c, h, w)
    pooled = torch.zeros_like(x)
    for r in range(h):
        for q in range(w):
            pooled[:, r, q] = x[:, max(0, r - 3):r + 4, max(0, q - 3):q + 4].sum((1, 2)) / 49
    y = torch.einsum("oc,chw->ohw", caa.conv1.weight[:, :, 0, 0], pooled)
    bn = caa.norm
    y = (y - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
    y = F.silu(y * bn.weight[:, None, None] + bn.bias[:, None, None])
    for conv, (kr, kq) in ((caa.h_conv, (1, k_w)), (caa.v_conv, (k_h, 1))):
        out = conv.bias[:, None, None].expand(c, h, w).clone()
        for r in range(h):
            for q in range(w):
                for dr in range(kr):
                    for dq in range(kq):
                        rr, qq = r + dr - kr // 2, q + dq - kq // 2
                        if 0 <= rr < h and 0 <= qq < w:
                            out[:, r, q] += conv.weight[:, 0, dr, dq] * y[:, rr, qq]
        y = out
    gate = torch.einsum("oc,chw->ohw", caa.conv2.weight[:, :, 0, 0], y)
    gate = gate + caa.conv2.bias[:, None, None]
    return torch.sigmoid(gate).reshape(-1, h * w).t()


def naive_caa_scores(head: CaaHead, images: TokenBatch, texts: TokenBatch) -> torch.Tensor:
    out = torch.zeros(len(images), len(texts), dtype=torch.float64)
    for i in range(len(images)):
        tokens = head.vision_proj(images.tokens[i])
        patches = tokens[head.patch_start:head.patch_start + head.num_patches]
        gate = naive_gate(head.caa, patches)
        values = patches * gate if head.gate_values == "scale" else patches + patches * gate
        prior = head.gate_prior * gate.mean(-1)
        for t in range(len(texts)):
            words = head.text_proj(texts.tokens[t][texts.mask[t]])
            visual = naive_slimmed_set(head, tokens[0], values, words, prior)
            out[i, t] = naive_max_mean(words, visual)
    return out


# ----------------------------------------------------------------------------- the gate


def test_kernel_rule_follows_the_grid():
    assert [anchor_kernel(s) for s in (16, 14, 7, 37, 4)] == [11, 9, 5, 25, 3]


@pytest.mark.parametrize("channels", ["one", "all"])
def test_gate_matches_naive_loops(channels):
    world, images, _, _ = make_data(n_images=2, captions=1, grid=(4, 5))
    head = CaaHead(world.image_spec, world.text_spec, embed_dim=8, gate_channels=channels,
                   kernel_size=None).double().eval()
    perturb(head)
    with torch.no_grad():
        _, _, patches, mask = head.project_images(images)
        got = head.gate(patches, mask)
        for i in range(len(images)):
            torch.testing.assert_close(got[i], naive_gate(head.caa, patches[i]), rtol=1e-10,
                                       atol=1e-10)
    assert got.shape[-1] == (1 if channels == "one" else 8)


@pytest.mark.parametrize("via_gram", [False, True])
@pytest.mark.parametrize("gate_values", ["scale", "residual"])
def test_block_score_matches_naive_per_pair_loop(monkeypatch, gate_values, via_gram):
    monkeypatch.setattr(patch_slimming, "gram_is_cheaper", lambda *sizes: via_gram)
    world, images, texts, _ = make_data(seed=1, n_images=3)
    head = CaaHead(world.image_spec, world.text_spec, embed_dim=16, keep_ratio=0.5, aggr_ratio=0.5,
                   gate_prior=2.0, gate_values=gate_values, chunk_elements=1).double().eval()
    perturb(head, seed=1)
    with torch.no_grad():
        got = head.score(head.encode_images(images), head.encode_texts(texts))
        want = naive_caa_scores(head, images, texts)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_gate_changes_the_selected_patches_and_the_scores():
    torch.manual_seed(0)
    world, images, texts, _ = make_data(seed=2, n_images=6)
    head = CaaHead(world.image_spec, world.text_spec, embed_dim=16, keep_ratio=0.5,
                   gate_prior=2.0).double().eval()
    laps = LapsHead(world.image_spec, world.text_spec, embed_dim=16, keep_ratio=0.5).double().eval()
    laps.vision_proj.load_state_dict(head.vision_proj.state_dict())
    laps.text_proj.load_state_dict(head.text_proj.state_dict())
    with torch.no_grad():
        txt = head.encode_texts(texts)
        # a constant gate (conv2 weight 0, bias 0 -> A = 0.5) keeps exactly LAPS's patches
        head.caa.conv2.weight.zero_()
        head.caa.conv2.bias.zero_()
        flat = head.select(head.encode_images(images), txt)
        assert torch.equal(flat, laps.select(laps.encode_images(images), laps.encode_texts(texts)))
        flat_scores = head.score(head.encode_images(images), txt)
        # a spatially varying gate changes the selection
        head.caa.conv2.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(0))
        gated = head.select(head.encode_images(images), txt)
        gated_scores = head.score(head.encode_images(images), txt)
    changed = (gated != flat).any(-1).float().mean()
    assert changed > 0.5, f"the gate changed the selection of only {changed:.0%} of the pairs"
    assert not torch.allclose(gated_scores, flat_scores)


# ----------------------------------------------------------------------------- training


def test_refiner_masks_padding():
    """CADR's released text refiner attends over padding; ours must not."""
    world, images, texts, _ = make_data(seed=4)
    head = CaaHead(world.image_spec, world.text_spec, embed_dim=16, refiner=True).double().eval()
    with torch.no_grad():
        img = head.encode_images(images)
        base = head.score(img, head.encode_texts(texts))
        wider = repad(TokenBatch(texts.tokens.float(), texts.mask), extra=5, seed=1).to(
            "cpu", torch.float64)
        torch.testing.assert_close(head.score(img, head.encode_texts(wider)), base,
                                   rtol=1e-12, atol=1e-12)


def test_dropped_patch_tokens_are_an_input_error_in_training():
    world, images, texts, image_of = make_data(seed=5)
    head = CaaHead(world.image_spec, world.text_spec, embed_dim=16).train()
    mask = images.mask.clone()
    mask[0, 3] = False
    with pytest.raises(InputError, match="image_token_drop"):
        head.encode_images(TokenBatch(images.tokens.float(), mask))


def test_caa_needs_a_grid():
    spec = FeatureSpec("image", 16, num_tokens=10, source="regions.h5")
    with pytest.raises(CacheMismatchError, match="regions.h5"):
        CaaHead(spec, FeatureSpec("text", 12))


def test_learns_synthetic_structured_data():
    torch.manual_seed(0)
    world = GridWorld(seed=7)
    head = CaaHead(world.image_spec, world.text_spec, embed_dim=32, keep_ratio=0.5, aggr_ratio=0.5)
    r1 = train_and_recall(head, HingeLoss(hardest_after_epochs=0), world, steps=100, batch_size=32,
                          lr=1e-2)
    assert r1 > 0.4, r1          # chance is 0.01; 0.66-0.75 over three seeds


# ----------------------------------------------------------------------------- registry, configs


@pytest.mark.parametrize("name", ["f30k_caa", "coco_caa", "f8k_caa"])
def test_configs_keep_the_grid_whole(name):
    """The gate convolves the full patch grid, so CAA configs turn image token drop off."""
    assert load_config(CONFIGS / f"{name}.yaml")["data"]["image_token_drop"] == 0.0
