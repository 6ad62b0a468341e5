"""Losses on hand-made score matrices (values and gradients computed by hand) and naive loops."""
from __future__ import annotations

import math

import pytest
import torch

from cache.errors import InputError
from heads.base import Progress
from heads.losses import (HingeLoss, InfoNCELoss, build_loss, hinge_loss, list_losses,
                          listnet_distillation)

# Margin 0.2. Violations [0.2 + S_ij - S_ii]_+ (image i -> caption j): (1,2) 0.1, (2,0) 0.1,
# (2,1) 0.15; [0.2 + S_ij - S_jj]_+ (caption j -> image i): (1,2) 0.5. Nothing else violates.
S3 = [[0.9, 0.5, 0.1],
      [0.55, 0.8, 0.7],
      [0.3, 0.35, 0.4]]
VSE0_3 = 0.1 + 0.1 + 0.15 + 0.5          # every violation
HARDEST_3 = 0.1 + 0.15 + 0.5             # row maxima 0, 0.1, 0.15; column maxima 0, 0, 0.5
GRAD_VSE0_3 = [[0, 0, 0], [0, -1, 2], [1, 1, -3]]
GRAD_HARDEST_3 = [[0, 0, 0], [0, -1, 2], [0, 1, -2]]

# Pairs 0 and 1 show the same image. With them masked: (2,3) 0.25 and (3,2) 0.05 image->caption,
# (2,3) 0.35 caption->image. Unmasked, (0,1) 0.3, (1,0) 0.35 image->caption and (1,0) 0.25,
# (0,1) 0.4 caption->image are added.
S4 = [[0.8, 0.9, 0.1, 0.0],
      [0.85, 0.7, 0.0, 0.1],
      [0.1, 0.2, 0.6, 0.65],
      [0.0, 0.1, 0.35, 0.5]]
IDS4 = [0, 0, 1, 2]
MASKED_4 = 0.25 + 0.05 + 0.35
UNMASKED_4 = MASKED_4 + 0.3 + 0.35 + 0.25 + 0.4


def _grad(fn, scores: list[list[float]]) -> tuple[float, torch.Tensor]:
    s = torch.tensor(scores, requires_grad=True)
    loss = fn(s)
    loss.backward()
    return float(loss.detach()), s.grad


@pytest.mark.parametrize("hardest,value,grad", [(False, VSE0_3, GRAD_VSE0_3),
                                                (True, HARDEST_3, GRAD_HARDEST_3)])
def test_hinge_value_and_gradient_by_hand(hardest: bool, value: float, grad: list) -> None:
    ids = torch.arange(3)
    got, g = _grad(lambda s: hinge_loss(s, ids, 0.2, hardest=hardest), S3)
    assert got == pytest.approx(value, abs=1e-6)
    assert torch.allclose(g, torch.tensor(grad, dtype=torch.float32))
    got_mean, g_mean = _grad(lambda s: hinge_loss(s, ids, 0.2, hardest=hardest, reduction="mean"), S3)
    assert got_mean == pytest.approx(value / 3, abs=1e-6)
    assert torch.allclose(g_mean, torch.tensor(grad, dtype=torch.float32) / 3)


def test_hinge_masks_captions_of_the_same_image() -> None:
    ids = torch.tensor(IDS4)
    for hardest in (False, True):
        masked, g = _grad(lambda s: hinge_loss(s, ids, hardest=hardest), S4)
        assert masked == pytest.approx(MASKED_4, abs=1e-6)
        assert float(g[0, 1]) == 0.0 and float(g[1, 0]) == 0.0
        unmasked = hinge_loss(torch.tensor(S4), ids, hardest=hardest, mask_same_image=False)
        assert float(unmasked) == pytest.approx(UNMASKED_4, abs=1e-6)
        assert float(hinge_loss(torch.tensor(S4), None, hardest=hardest)) == pytest.approx(UNMASKED_4)


def test_hinge_schedule() -> None:
    s, ids = torch.tensor(S3), torch.arange(3)
    expect = {1: (VSE0_3, HARDEST_3, HARDEST_3), 0: (HARDEST_3,) * 3, None: (VSE0_3,) * 3,
              2: (VSE0_3, VSE0_3, HARDEST_3)}
    for after, values in expect.items():
        loss = HingeLoss(hardest_after_epochs=after)
        for epoch, value in enumerate(values):
            assert float(loss(s, ids, Progress(epoch=epoch))) == pytest.approx(value, abs=1e-6)


def test_hinge_rejects_bad_input() -> None:
    with pytest.raises(InputError):
        HingeLoss(reduction="avg")
    with pytest.raises(ValueError):
        hinge_loss(torch.zeros(3, 4), torch.arange(3))


def infonce_direct(s: list[list[float]], ids: list[int], temperature: float, mask: bool) -> float:
    n = len(s)

    def ce(query: int, score) -> float:      # score(query, candidate)
        keep = [c for c in range(n) if c == query or not (mask and ids[c] == ids[query])]
        log_z = math.log(sum(math.exp(score(query, c) / temperature) for c in keep))
        return log_z - score(query, query) / temperature

    i2t = sum(ce(i, lambda q, c: s[q][c]) for i in range(n)) / n
    t2i = sum(ce(j, lambda q, c: s[c][q]) for j in range(n)) / n
    return (i2t + t2i) / 2


@pytest.mark.parametrize("mask", [True, False])
def test_infonce_against_direct_formula(mask: bool) -> None:
    loss = InfoNCELoss(temperature=0.1, mask_same_image=mask)
    got = loss(torch.tensor(S4), torch.tensor(IDS4), Progress())
    assert float(got.detach()) == pytest.approx(infonce_direct(S4, IDS4, 0.1, mask), rel=1e-5)
    got.backward()
    assert loss.log_scale.grad is not None and float(loss.log_scale.grad) != 0.0


def test_infonce_gradient_by_hand() -> None:
    # 2x2, T = 1: d/dS_00 of (CE_row0 + CE_col0 + ...)/2/2 = (p_00 - 1) / 2 with p from a softmax.
    s = torch.tensor([[1.0, 0.0], [0.5, 2.0]], requires_grad=True)
    InfoNCELoss(temperature=1.0, learnable=False)(s, torch.arange(2)).backward()
    row0 = torch.softmax(torch.tensor([1.0, 0.0]), 0)
    col0 = torch.softmax(torch.tensor([1.0, 0.5]), 0)
    assert float(s.grad[0, 0]) == pytest.approx(((row0[0] - 1) + (col0[0] - 1)).item() / 4, rel=1e-5)
    assert float(s.grad[0, 1]) == pytest.approx(row0[1].item() / 4 + (torch.softmax(
        torch.tensor([0.0, 2.0]), 0)[0]).item() / 4, rel=1e-5)


def test_infonce_temperature_clamp_and_buffer() -> None:
    fixed = InfoNCELoss(temperature=0.05, learnable=False)
    assert list(fixed.parameters()) == [] and float(fixed.temperature) == pytest.approx(0.05)
    learn = InfoNCELoss(temperature=0.07)
    with torch.no_grad():
        learn.log_scale.fill_(10.0)
    assert float(learn.temperature.detach()) == pytest.approx(0.01)
    with pytest.raises(InputError):
        InfoNCELoss(temperature=0.001)


def test_listnet_against_naive_loop() -> None:
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(4, 4, generator=g) * 3
    student = torch.randn(4, 4, generator=g).requires_grad_(True)
    t, s = teacher.tolist(), (6.0 * student.detach()).tolist()

    def softmax(v: list[float]) -> list[float]:
        m = max(v)
        e = [math.exp(x - m) for x in v]
        return [x / sum(e) for x in e]

    def ce(tv: list[float], sv: list[float]) -> float:
        return -sum(p * math.log(q + 1e-10) for p, q in zip(softmax(tv), softmax(sv)))

    rows = sum(ce(t[i], s[i]) for i in range(4)) / 4
    cols = sum(ce([t[i][j] for i in range(4)], [s[i][j] for i in range(4)]) for j in range(4)) / 4
    teacher.requires_grad_(True)
    got = listnet_distillation(teacher, student)
    assert float(got.detach()) == pytest.approx(rows + cols, rel=1e-5)
    got.backward()
    assert teacher.grad is None and float(student.grad.abs().sum()) > 0


def test_registry() -> None:
    assert list_losses() == ["hinge", "infonce"]
    loss = build_loss("hinge", margin=0.1, hardest_after_epochs=0, reduction="mean")
    assert isinstance(loss, HingeLoss) and loss.margin == 0.1
    assert isinstance(build_loss("infonce", temperature=0.05), InfoNCELoss)
    with pytest.raises(InputError, match="available"):
        build_loss("triplet")
    with pytest.raises(InputError, match="no option"):
        build_loss("hinge", temperature=0.1)
