"""Shared layers against direct per-sample formulas written here."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from heads.layers import (GPO, MaskedBatchNorm1d, ResidualMLPProjection, TokenProjection, l2norm,
                          masked_logsumexp, masked_max, masked_mean, masked_softmax,
                          masked_topk_mean, max_mean_alignment, mrsw, mrsw_block, sinusoid_codes,
                          strip_special)


def random_mask(rows: int, width: int, seed: int, min_valid: int = 1) -> torch.Tensor:
    """A mask with valid tokens scattered (not a prefix) and at least ``min_valid`` per row."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(rows, width, generator=g) > 0.4
    mask[:, :min_valid] = True
    return mask[:, torch.randperm(width, generator=g)]


def test_l2norm_and_strip_special() -> None:
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    assert torch.allclose(l2norm(x), torch.tensor([[0.6, 0.8], [0.0, 0.0]]))
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    out = strip_special(mask, prefix=1, suffix=1)
    assert out.tolist() == [[False, True, True, False, False], [False, True, False, False, False],
                            [False] * 5]
    assert torch.equal(strip_special(mask), mask)


def test_masked_mean_max_topk_against_loops() -> None:
    x = torch.randn(4, 6, 3)
    mask = random_mask(4, 6, seed=1)
    mask[3] = False
    mask[3, 2] = True                                    # a row with a single valid vector
    mean, top2, top3 = masked_mean(x, mask), masked_topk_mean(x, mask, 2), masked_topk_mean(x, mask, 3)
    best = masked_max(x, mask.unsqueeze(-1), dim=1)
    for b in range(4):
        valid = x[b][mask[b]]
        assert torch.allclose(mean[b], valid.mean(0), atol=1e-6)
        assert torch.allclose(best[b], valid.max(0).values)
        for k, out in ((2, top2), (3, top3)):
            ref = valid.sort(0, descending=True).values[:k].mean(0)
            assert torch.allclose(out[b], ref, atol=1e-6)
    empty = torch.zeros(1, 6, dtype=torch.bool)
    assert torch.equal(masked_mean(x[:1], empty), torch.zeros(1, 3))
    assert torch.equal(masked_topk_mean(x[:1], empty), torch.zeros(1, 3))


def test_masked_softmax_and_logsumexp() -> None:
    x = torch.randn(3, 5, requires_grad=True)
    mask = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    sm, lse = masked_softmax(x, mask, -1), masked_logsumexp(x, mask, -1)
    for r in (0, 2):
        assert torch.allclose(sm[r][mask[r]], torch.softmax(x[r][mask[r]], 0))
        assert torch.allclose(lse[r], torch.logsumexp(x[r][mask[r]], 0))
    assert torch.equal(sm[1], torch.zeros(5)) and float(lse[1].detach()) == 0.0
    assert torch.equal(sm[~mask], torch.zeros(int((~mask).sum())))
    (sm.sum() + lse.sum()).backward()
    assert torch.isfinite(x.grad).all()


def test_sinusoid_codes_formula() -> None:
    codes = sinusoid_codes(7, 8)
    for k in range(7):
        for i in range(4):
            angle = k / 10000 ** (2 * i / 8)
            assert math.isclose(float(codes[k, 2 * i]), math.sin(angle), abs_tol=1e-5)
            assert math.isclose(float(codes[k, 2 * i + 1]), math.cos(angle), abs_tol=1e-5)


def gpo_direct(gpo: GPO, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GPO per sample: a bi-GRU (the module's weights) on exactly N codes, sorted channels."""
    bigru = torch.nn.GRU(gpo.d_pe, gpo.gru_forward.hidden_size, batch_first=True, bidirectional=True)
    with torch.no_grad():
        for name, value in gpo.gru_forward.named_parameters():
            getattr(bigru, name).copy_(value)
            getattr(bigru, name + "_reverse").copy_(getattr(gpo.gru_backward, name))
    hidden = gpo.gru_forward.hidden_size
    out = []
    for b in range(x.shape[0]):
        valid = x[b][mask[b]]
        n = valid.shape[0]
        codes = torch.tensor([[math.sin(k / 10000 ** (i / gpo.d_pe)) if i % 2 == 0 else
                               math.cos(k / 10000 ** ((i - 1) / gpo.d_pe)) for i in range(gpo.d_pe)]
                              for k in range(n)])
        states = bigru(codes.unsqueeze(0))[0][0]
        h = (states[:, :hidden] + states[:, hidden:]) / 2
        theta = torch.softmax(gpo.score(h).squeeze(-1) / 0.1, dim=0)
        ranked = valid.sort(dim=0, descending=True).values
        out.append((theta.unsqueeze(1) * ranked).sum(0))
    return torch.stack(out)


def test_gpo_matches_direct_formula_with_variable_lengths() -> None:
    torch.manual_seed(0)
    gpo = GPO()
    x = torch.randn(5, 9, 6)
    mask = random_mask(5, 9, seed=2)
    mask[0] = False
    mask[0, 4] = True                                    # N = 1
    mask[1] = True                                       # N = 9 (no padding)
    x = x.masked_fill(~mask.unsqueeze(-1), 100.0)        # padding that would win every max
    with torch.no_grad():
        out, ref = gpo(x, mask), gpo_direct(gpo, x, mask)
        assert torch.allclose(out, ref, atol=1e-5)
        # more padding changes nothing
        wider = torch.cat([x, 50 * torch.ones(5, 4, 6)], dim=1)
        wider_mask = torch.cat([mask, torch.zeros(5, 4, dtype=torch.bool)], dim=1)
        assert torch.allclose(gpo(wider, wider_mask), out, atol=1e-6)
        weights = gpo.pool_weights(mask.sum(1), 9)
    assert torch.allclose(weights.sum(1), torch.ones(5))
    assert float(weights[0, 1:].abs().max()) == 0.0


def test_gpo_gradient_reaches_all_parameters() -> None:
    gpo = GPO()
    x = torch.randn(4, 7, 5, requires_grad=True)
    mask = random_mask(4, 7, seed=3)
    (gpo(x, mask) * torch.randn(4, 5)).sum().backward()
    assert x.grad is not None and float(x.grad[~mask].abs().max()) == 0.0
    for name, p in gpo.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name


def test_masked_batchnorm_uses_valid_rows_only() -> None:
    torch.manual_seed(0)
    bn, ref = MaskedBatchNorm1d(4), torch.nn.BatchNorm1d(4)
    ref.load_state_dict(bn.state_dict())
    rows = torch.randn(10, 4)
    valid = torch.tensor([1, 0, 1, 1, 0, 1, 1, 1, 0, 1], dtype=torch.bool)
    padded = rows.masked_fill(~valid.unsqueeze(1), 0.0)
    out = bn(padded, valid)
    assert torch.allclose(out[valid], ref(rows[valid]), atol=1e-5)
    assert torch.allclose(bn.running_mean, ref.running_mean, atol=1e-6)
    assert torch.allclose(bn.running_var, ref.running_var, atol=1e-6)
    bn.eval(), ref.eval()
    assert torch.allclose(bn(rows, valid), ref(rows), atol=1e-6)


def test_residual_mlp_projection_padding_invariant() -> None:
    torch.manual_seed(0)
    proj = ResidualMLPProjection(6, 8)
    assert proj.mlp_in.out_features == 4
    x = torch.randn(3, 5, 6)
    mask = random_mask(3, 5, seed=4)
    out = proj(x.masked_fill(~mask.unsqueeze(-1), 0), mask)
    flat = proj(x[mask])                                 # [M, D]: BatchNorm over exactly M rows
    assert torch.allclose(out[mask], flat, atol=1e-5)
    wider = torch.cat([x, 9 * torch.randn(3, 3, 6)], dim=1)
    wider_mask = torch.cat([mask, torch.zeros(3, 3, dtype=torch.bool)], dim=1)
    assert torch.allclose(proj(wider, wider_mask)[wider_mask], flat, atol=1e-5)
    bound = math.sqrt(6 / (6 + 8))
    assert float(proj.fc.weight.detach().abs().max()) <= bound
    assert float(proj.fc.bias.detach().abs().max()) == 0.0


def test_token_projection_zeroes_padding() -> None:
    proj = TokenProjection(5, 3)
    mask = random_mask(2, 4, seed=5)
    with torch.no_grad():
        out = proj(torch.randn(2, 4, 5), mask)
    assert torch.allclose(out[mask].norm(dim=-1), torch.ones(int(mask.sum())), atol=1e-5)
    assert float(out[~mask].abs().max()) == 0.0


def _normalised_sets(n: int, width: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = random_mask(n, width, seed)
    x = l2norm(torch.randn(n, width, dim, generator=g))
    return x.masked_fill(~mask.unsqueeze(-1), 3.0), mask       # padding would raise any score


def test_max_mean_alignment_against_loop() -> None:
    img, img_mask = _normalised_sets(6, 7, 5, seed=6)
    txt, txt_mask = _normalised_sets(6, 4, 5, seed=7)
    out = max_mean_alignment(img, img_mask, txt, txt_mask, negative_slope=0.1)
    for p in range(6):
        words = [txt[p, l] for l in range(4) if txt_mask[p, l]]
        tokens = [img[p, v] for v in range(7) if img_mask[p, v]]
        a = [[F.leaky_relu(torch.dot(w, t), 0.1).item() for t in tokens] for w in words]
        t2i = sum(max(row) for row in a) / len(words)
        i2t = sum(max(a[l][v] for l in range(len(words))) for v in range(len(tokens))) / len(tokens)
        assert math.isclose(float(out[p]), t2i + i2t, abs_tol=1e-5)


def test_mrsw_and_block_against_loop() -> None:
    img, img_mask = _normalised_sets(3, 6, 5, seed=8)
    txt, txt_mask = _normalised_sets(4, 5, 5, seed=9)

    def naive(i: int, t: int) -> float:
        total = 0.0
        for w in range(5):
            if txt_mask[t, w]:
                total += max(torch.dot(txt[t, w], img[i, r]).item() for r in range(6) if img_mask[i, r])
        return total

    block = mrsw_block(img, img_mask, txt, txt_mask)
    assert block.shape == (3, 4)
    for i in range(3):
        for t in range(4):
            assert math.isclose(float(block[i, t]), naive(i, t), abs_tol=1e-5)
    rows_i, rows_t = torch.tensor([0, 2, 1]), torch.tensor([3, 0, 1])
    pairs = mrsw(img[rows_i], img_mask[rows_i], txt[rows_t], txt_mask[rows_t])
    assert torch.allclose(pairs, block[rows_i, rows_t], atol=1e-6)
    words = txt_mask.sum(dim=1).float()                       # MrAVGw: the sum over valid words
    averaged = mrsw_block(img, img_mask, txt, txt_mask, word_pool="mean")
    assert torch.allclose(averaged, block / words.unsqueeze(0), atol=1e-6)
    assert torch.allclose(mrsw(img[rows_i], img_mask[rows_i], txt[rows_t], txt_mask[rows_t],
                               word_pool="mean"), averaged[rows_i, rows_t], atol=1e-6)
    with pytest.raises(ValueError, match="word_pool"):
        mrsw_block(img, img_mask, txt, txt_mask, word_pool="max")


def test_mrsw_has_no_hidden_relu() -> None:
    img = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])       # one real region, one padding slot
    txt = torch.tensor([[[-1.0, 0.0]]])                  # a word opposite to the region
    img_mask, txt_mask = torch.tensor([[True, False]]), torch.tensor([[True]])
    assert float(mrsw(img, img_mask, txt, txt_mask)) == pytest.approx(-1.0)
    assert float(mrsw_block(img, img_mask, txt, txt_mask)) == pytest.approx(-1.0)
