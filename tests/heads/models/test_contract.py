"""What every registered head must do, checked for each head of ``list_heads()`` and each of its
inference modes: build from cache specs, encode every item, score a block of the right shape,
agree with ``score_pairs`` on every pair, ignore batch padding, send a gradient to every parameter
it does not freeze by design, survive a checkpoint round trip, and score finitely under bf16
autocast. Head-specific behaviour (formulas against naive loops, options, learning) lives in the
head's own test file."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from heads.base import Head, Progress, index_encoded
from heads.checkpoint import FORMAT_VERSION, load_checkpoint, load_pretrained_parts, save_checkpoint
from heads.losses import HingeLoss
from heads.model import head_from_checkpoint
from heads.registry import build_head, list_heads
from tests.heads.patch_world import GridWorld
from tests.heads.synthetic_pairs import repad
from tests.heads.token_family_data import FramedWorld

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ALADIN_SMALL = dict(embed_dim=16, teacher_ff_dim=32, student_ff_dim=16, teacher_layers=1,
                    student_layers=1, heads=2, dropout=0.0)

# Small option sets for each head; the first is its test default, the others are option variants
# that add parameters or code paths (a variant is a separate case of every contract test).
CASES: dict[str, list[dict[str, Any]]] = {
    "linear": [dict(embed_dim=8), dict(embed_dim=8, use_prefix=False)],
    "vse": [dict(embed_dim=8), dict(embed_dim=8, image_mlp=True, mlp_hidden=6)],
    "scan": [dict(embed_dim=8), dict(embed_dim=8, pooling="avg")],
    "laps": [dict(embed_dim=16), dict(embed_dim=16, score_net=True)],
    "caa": [dict(embed_dim=16),
            dict(embed_dim=16, gate_channels="all", gate_values="residual", refiner=True),
            dict(embed_dim=16, score_net=True)],
    "hrem": [dict(embed_dim=16, heads=2, graph_warmup_steps=0),
             dict(embed_dim=16, heads=2, graph_warmup_steps=0, base_loss="dws_triplet",
                  dws_dim=8),
             dict(embed_dim=16, heads=2, graph_warmup_steps=0, pooling="mean")],
    "tgdt": [dict(embed_dim=16, ff_dim=32, heads=2, local_layers=1, global_layers=1)],
    "aladin": [dict(ALADIN_SMALL, stage="joint"), dict(ALADIN_SMALL, stage="teacher"),
               dict(ALADIN_SMALL, stage="student")],   # its teacher: written by ``make_head``
}


def cases() -> list[Any]:
    return [pytest.param(name, i, id=f"{name}-{i}")
            for name in list_heads() for i in range(len(CASES.get(name, [{}])))]


def test_every_registered_head_has_contract_cases():
    assert sorted(CASES) == list_heads(), "add small options for the new head to CASES"


class ContractWorld(GridWorld, FramedWorld):
    """Images on a 4 x 4 patch grid with a CLS token; captions framed as ``[CLS] words [SEP]``."""


@pytest.fixture(scope="module")
def world() -> ContractWorld:
    return ContractWorld(seed=11)


def make_head(name: str, case: int, world: ContractWorld, folder: Path) -> Head:
    """The head as the trainer builds it: constructed, then its pretrained parts copied in."""
    return build_case(name, case, world, folder)[0]


def build_case(name: str, case: int, world: ContractWorld, folder: Path
               ) -> tuple[Head, dict[str, Any]]:
    """``make_head`` and the options it was built with (a student's teacher file included)."""
    options = CASES[name][case]
    if name == "aladin" and options["stage"] == "student":
        torch.manual_seed(1)
        teacher = build_head(name, world.image_spec, world.text_spec,
                             **dict(options, stage="teacher"))
        options = dict(options, teacher_checkpoint=write_run(teacher, folder / "teacher.pt", {}))
    torch.manual_seed(0)
    head = build_head(name, world.image_spec, world.text_spec, **options)
    load_pretrained_parts(head)
    return head, options


def write_run(head: Head, path: Path, options: dict[str, Any]) -> str:
    """A checkpoint of ``head`` with the fields the trainer writes."""
    save_checkpoint({"format": FORMAT_VERSION, "head_name": head.name, "head_options": options,
                     "image_spec": head.image_spec.to_dict(),
                     "text_spec": head.text_spec.to_dict(), "features": {},
                     "model": head.state_dict(), "config": {}, "epoch": 0, "step": 0}, path)
    return str(path)


def modes(head: Head) -> list[str | None]:
    return [None, *sorted(head.modes)]


@torch.no_grad()
def all_scores(head: Head, images, texts) -> dict[str | None, torch.Tensor]:
    """The score block of every inference mode, in eval mode."""
    head.eval()
    out = {}
    for mode in modes(head):
        head.set_mode(mode)
        out[mode] = head.score(head.encode_images(images), head.encode_texts(texts))
    head.set_mode(None)
    return out


@pytest.mark.parametrize("name, case", cases())
def test_every_item_encoded_and_every_pair_scored_alike(name, case, world, tmp_path):
    """Each encoded tensor has one row per item; ``score`` gives a finite [images, captions]
    block equal to ``score_pairs`` over the same pairs, in every inference mode."""
    head = make_head(name, case, world, tmp_path).eval()
    images, texts, _ = world.sample(4, captions_per_image=2)
    with torch.no_grad():
        for mode in modes(head):
            head.set_mode(mode)
            img, txt = head.encode_images(images), head.encode_texts(texts)
            assert {k: v.shape[0] for k, v in img.items()} == dict.fromkeys(img, 4), mode
            assert {k: v.shape[0] for k, v in txt.items()} == dict.fromkeys(txt, 8), mode
            block = head.score(img, txt)
            assert block.shape == (4, 8) and torch.isfinite(block).all(), mode
            rows_i = torch.arange(4).repeat_interleave(8)
            rows_t = torch.arange(8).repeat(4)
            pairs = head.score_pairs(index_encoded(img, rows_i), index_encoded(txt, rows_t))
            torch.testing.assert_close(pairs.view_as(block), block, rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f"mode {mode}: {m}")


@pytest.mark.parametrize("name, case", cases())
def test_batch_padding_does_not_change_scores(name, case, world, tmp_path):
    """Padding positions hold garbage; a caption batch padded wider scores the same (images too,
    unless the head reads a fixed patch grid)."""
    head = make_head(name, case, world, tmp_path)
    images, texts, _ = world.sample(4, captions_per_image=2)
    wider_images = images if head.requires_grid else repad(images, extra=3, seed=1)
    base = all_scores(head, images, texts)
    padded = all_scores(head, wider_images, repad(texts, extra=5, seed=2))
    for mode, scores in base.items():
        torch.testing.assert_close(padded[mode], scores, rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"mode {mode}: {m}")


@pytest.mark.parametrize("name, case", cases())
def test_gradient_reaches_every_parameter_not_frozen_by_design(name, case, world, tmp_path):
    head = make_head(name, case, world, tmp_path).train()
    images, texts, image_of = world.sample(8)
    loss, logs = head.training_loss(images, texts, image_of, HingeLoss(hardest_after_epochs=None),
                                    Progress(epoch=1, step=10, steps_per_epoch=10))
    loss.backward()
    assert torch.isfinite(loss) and "loss" in logs
    frozen = head.frozen_prefixes()
    missing, leaked = [], []
    for param_name, p in head.named_parameters():
        reached = p.grad is not None and bool(p.grad.abs().sum() > 0)
        if frozen and param_name.startswith(frozen):
            if reached:
                leaked.append(param_name)
        elif not reached:
            missing.append(param_name)
    assert not missing, f"no gradient: {missing}"
    assert not leaked, f"declared frozen, but a gradient reached: {leaked}"


@pytest.mark.parametrize("name, case", cases())
def test_checkpoint_round_trip_gives_the_same_scores(name, case, world, tmp_path):
    head, options = build_case(name, case, world, tmp_path)
    images, texts, _ = world.sample(4, captions_per_image=2)
    path = write_run(head, tmp_path / "best.pt", options)
    (tmp_path / "teacher.pt").unlink(missing_ok=True)   # a run rebuilds without its sources
    rebuilt = head_from_checkpoint(load_checkpoint(path))
    expected, actual = all_scores(head, images, texts), all_scores(rebuilt, images, texts)
    for mode, scores in expected.items():
        torch.testing.assert_close(actual[mode], scores, rtol=0, atol=0,
                                   msg=lambda m: f"mode {mode}: {m}")


@pytest.mark.parametrize("name, case", cases())
def test_bf16_autocast_scores_stay_close_and_train(name, case, world, tmp_path):
    head = make_head(name, case, world, tmp_path).eval()
    images, texts, ids = world.sample(6)
    reference = all_scores(head, images, texts)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = all_scores(head, images, texts)
        head.train()
        loss, _ = head.training_loss(images, texts, ids, HingeLoss(hardest_after_epochs=None),
                                     Progress(epoch=1, step=10, steps_per_epoch=10))
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in head.parameters() if p.grad is not None)
    for mode, scores in reference.items():     # mean, not max: bf16 may flip a top-K selection
        assert torch.isfinite(low[mode]).all(), mode
        error = float((low[mode].float() - scores).abs().mean())
        scale = float(scores.abs().max()) + 1.0
        assert error < 0.02 * scale, (mode, error, scale)
