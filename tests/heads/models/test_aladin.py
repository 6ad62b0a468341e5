"""ALADIN head: teacher MrSw against a naive loop, ListNet distillation against naive loops, where
the distillation gradient goes, the distillation delay, every loss key, teacher checkpoints,
inference modes, and learning (teacher, then a student distilled from it)."""
from __future__ import annotations

import math

import pytest
import torch

from cache.batch import TokenBatch
from cache.errors import InputError
from heads.base import FeatureSpec, Progress, index_encoded
from heads.checkpoint import FORMAT_VERSION, load_checkpoint, load_pretrained_parts, save_checkpoint
from heads.layers import l2norm
from heads.losses import HingeLoss
from heads.model import head_from_checkpoint
from heads.registry import build_head
from tests.heads.synthetic_pairs import repad
from tests.heads.token_family_data import FramedWorld, recall_at_1, sample, train_head

SMALL = dict(embed_dim=16, teacher_ff_dim=32, student_ff_dim=16, teacher_layers=1,
             student_layers=1, heads=2, dropout=0.0)
CRITERION = HingeLoss(margin=0.2, hardest_after_epochs=0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world() -> FramedWorld:
    return FramedWorld(seed=4)


def make_head(world: FramedWorld, seed: int = 0, **options):
    """A head as the trainer builds it: constructed, then its teacher copied in (stage student)."""
    torch.manual_seed(seed)
    head = build_head("aladin", world.image_spec, world.text_spec, **{**SMALL, **options})
    load_pretrained_parts(head)
    return head


def write_run(head, path) -> str:
    """A checkpoint of ``head`` in the trainer's format (the fields ``load_checkpoint`` needs)."""
    spec = head.image_spec.to_dict(), head.text_spec.to_dict()
    save_checkpoint({"format": FORMAT_VERSION, "head_name": head.name, "head_options": {},
                     "image_spec": spec[0], "text_spec": spec[1], "features": {},
                     "model": head.state_dict(), "config": {}, "epoch": 0, "step": 0}, path)
    return str(path)


def one_item(batch: TokenBatch, row: int) -> TokenBatch:
    n = int(batch.mask[row].sum())
    return TokenBatch(batch.tokens[row:row + 1, :n], batch.mask[row:row + 1, :n])


def naive_mrsw(head, split) -> torch.Tensor:
    """Teacher MrSw of every pair, one unpadded item at a time, [CLS]/[SEP]/image CLS dropped."""
    regions = [l2norm(head.teacher.tokens(one_item(split.images, i), False)[0, 1:])
               for i in range(len(split.images))]
    words = [l2norm(head.teacher.tokens(one_item(split.texts, j), True)[0, 1:-1])
             for j in range(len(split.texts))]
    return torch.tensor([[sum(max(float(w @ r) for r in reg) for w in ws) for ws in words]
                         for reg in regions])


def naive_listnet(teacher: torch.Tensor, student: torch.Tensor, scale: float) -> float:
    total = 0.0
    for matrix_t, matrix_s in ((teacher, student), (teacher.T, student.T)):
        rows = []
        for t_row, s_row in zip(matrix_t.tolist(), matrix_s.tolist()):
            zt = sum(math.exp(t) for t in t_row)
            zs = sum(math.exp(scale * s) for s in s_row)
            rows.append(-sum(math.exp(t) / zt * math.log(math.exp(scale * s) / zs + 1e-10)
                             for t, s in zip(t_row, s_row)))
        total += sum(rows) / len(rows)
    return total


def test_teacher_score_matches_naive_mrsw_loop(world):
    head = make_head(world, stage="teacher").eval()
    split = sample(world, 5)
    assert head.score_kind == "interaction"                       # teacher stage: teacher default
    with torch.no_grad():
        scores = head.score(head.encode_images(split.images), head.encode_texts(split.texts))
        assert torch.allclose(scores, naive_mrsw(head, split), atol=1e-4)


def _distillation_case(world, **options):
    """The distillation-only loss of a fresh head on one batch, and its teacher and student
    score matrices for that batch."""
    head = make_head(world, alignment_weight=0.0, matching_weight=0.0, student_scale=4.0,
                     **options).train()
    batch = sample(world, 6).batch(torch.arange(0, 12, 2))
    loss, logs = head.training_loss(*batch, CRITERION, Progress())
    with torch.no_grad():
        img, txt = head.encode_images(batch[0]), head.encode_texts(batch[1])
        head.set_mode("teacher")
        teacher = head.score(img, txt)
        head.set_mode("student")
        student = head.score(img, txt)
    return loss, logs, teacher, student


def test_distillation_term_matches_naive_listnet(world):
    loss, logs, teacher, student = _distillation_case(world)
    assert set(logs) == {"loss", "distillation"}
    assert loss.item() == pytest.approx(naive_listnet(teacher, student, 4.0), rel=1e-4)


@pytest.mark.parametrize("word_pool", ["sum", "mean"])
def test_teacher_scale_sharpens_the_teacher_of_the_distillation(world, word_pool):
    loss, _, teacher, student = _distillation_case(world, teacher_scale=3.0, word_pool=word_pool)
    assert loss.item() == pytest.approx(naive_listnet(3.0 * teacher, student, 4.0), rel=1e-4)


def _grad_sum(module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


def test_distillation_gradient_reaches_the_student_not_the_teacher(world):
    split = sample(world, 8)
    batch = split.batch(torch.arange(16))
    joint = make_head(world, alignment_weight=0.0, matching_weight=0.0).train()
    joint.training_loss(*batch, CRITERION, Progress())[0].backward()
    assert _grad_sum(joint.student) > 0 and _grad_sum(joint.teacher) == 0
    # student_input="teacher" is the reference topology: the student path reaches the teacher
    shared = make_head(world, alignment_weight=0.0, matching_weight=0.0,
                       student_input="teacher").train()
    shared.training_loss(*batch, CRITERION, Progress())[0].backward()
    assert _grad_sum(shared.teacher) > 0


def test_student_stage_freezes_the_loaded_teacher(world, tmp_path):
    teacher_run = make_head(world, seed=1, stage="teacher")
    path = write_run(teacher_run, tmp_path / "best.pt")
    head = make_head(world, seed=2, stage="student", teacher_checkpoint=path)
    for (name, p), q in zip(head.teacher.named_parameters(), teacher_run.teacher.parameters()):
        assert torch.equal(p, q) and not p.requires_grad, name
    head.train()
    assert not head.teacher.training and head.student.training
    assert head.score_kind == "embedding"
    before = {k: v.clone() for k, v in head.teacher.state_dict().items()}
    split = sample(world, 8)
    train_head(head, split, steps=3, batch_size=8)
    assert all(torch.equal(before[k], v) for k, v in head.teacher.state_dict().items())
    head.zero_grad()
    head.training_loss(*split.batch(torch.arange(8)), CRITERION, Progress())[0].backward()
    assert _grad_sum(head.student) > 0
    assert all(p.grad is None for p in head.teacher.parameters())


def test_teacher_checkpoint_errors(world, tmp_path):
    with pytest.raises(InputError, match="teacher_checkpoint"):
        make_head(world, stage="student")
    with pytest.raises(InputError, match="none.pt: checkpoint not found"):
        make_head(world, stage="student", teacher_checkpoint=str(tmp_path / "none.pt"))
    never_loaded = build_head("aladin", world.image_spec, world.text_spec, stage="student",
                              teacher_checkpoint=str(tmp_path / "none.pt"), **SMALL)
    batch = sample(world, 4).batch(torch.arange(8))
    with pytest.raises(InputError, match="teacher of stage 'student' was never loaded"):
        never_loaded.training_loss(*batch, CRITERION, Progress())
    with pytest.raises(InputError, match="never loaded"):
        never_loaded.encode_images(batch[0])
    wide = make_head(world, stage="teacher", embed_dim=32)
    with pytest.raises(InputError, match="does not fit"):
        make_head(world, stage="student", teacher_checkpoint=write_run(wide, tmp_path / "w.pt"))
    other = build_head("linear", world.image_spec, world.text_spec)
    with pytest.raises(InputError, match="head 'linear'"):
        make_head(world, stage="student", teacher_checkpoint=write_run(other, tmp_path / "l.pt"))


def test_only_the_teacher_of_a_teacher_run_is_loaded(world, tmp_path):
    """A joint run also holds a trained student: a new student run takes its teacher only."""
    joint = make_head(world, seed=1, stage="joint")
    path = write_run(joint, tmp_path / "joint.pt")
    student = make_head(world, seed=2, stage="student", teacher_checkpoint=path)
    fresh = make_head(world, seed=2, stage="joint")
    for name, value in student.state_dict().items():
        source = joint if name.startswith("teacher.") else fresh
        assert torch.equal(value, source.state_dict()[name]), name
    assert student.frozen_prefixes() == ("teacher.",) and joint.frozen_prefixes() == ()


def test_a_student_run_rebuilds_without_its_teacher_file(world, tmp_path):
    teacher_path = write_run(make_head(world, seed=1, stage="teacher"), tmp_path / "teacher.pt")
    student = make_head(world, seed=2, stage="student", teacher_checkpoint=teacher_path)
    student_path = write_run(student, tmp_path / "student.pt")
    (tmp_path / "teacher.pt").unlink()
    state = load_checkpoint(student_path)
    state["head_options"] = {**SMALL, "stage": "student", "teacher_checkpoint": teacher_path}
    rebuilt = head_from_checkpoint(state).eval()
    split = sample(world, 3)
    with torch.no_grad():
        for mode in ("student", "teacher"):
            student.eval().set_mode(mode)
            rebuilt.set_mode(mode)
            expected = student.score(student.encode_images(split.images),
                                     student.encode_texts(split.texts))
            got = rebuilt.score(rebuilt.encode_images(split.images),
                                rebuilt.encode_texts(split.texts))
            assert torch.equal(expected, got)


def test_distillation_delay_is_honoured(world):
    head = make_head(world, distill_after_steps=3).train()
    batch = sample(world, 8).batch(torch.arange(16))
    for step, expected in ((0, False), (2, False), (3, True), (10, True)):
        torch.manual_seed(0)
        loss, logs = head.training_loss(*batch, CRITERION, Progress(step=step))
        assert ("distillation" in logs) == expected, step
        assert torch.isclose(loss, sum(v for k, v in logs.items() if k != "loss"))
        assert {"alignment", "matching"} <= set(logs)


@pytest.mark.parametrize("key, value", [("alignment_weight", 2.0), ("matching_weight", 0.5),
                                        ("distill_weight", 2.0), ("student_scale", 3.0)])
def test_every_loss_key_changes_the_loss(world, key, value):
    batch = sample(world, 16).batch(torch.arange(0, 32, 2))
    loss, logs = make_head(world).train().training_loss(*batch, CRITERION, Progress())
    changed, changed_logs = make_head(world, **{key: value}).train().training_loss(
        *batch, CRITERION, Progress())
    assert not torch.isclose(loss, changed)
    if key.endswith("_weight"):
        term = {"alignment_weight": "alignment", "matching_weight": "matching",
                "distill_weight": "distillation"}[key]
        default = {"alignment_weight": 1.0, "matching_weight": 0.1, "distill_weight": 1.0}[key]
        assert torch.isclose(changed_logs[term], logs[term] * value / default)


def test_stage_terms_and_option_errors(world):
    batch = sample(world, 8).batch(torch.arange(16))
    _, logs = make_head(world, stage="teacher").train().training_loss(*batch, CRITERION, Progress())
    assert set(logs) == {"loss", "alignment"}
    with pytest.raises(InputError, match="stage"):
        make_head(world, stage="both")
    with pytest.raises(InputError, match="trains nothing"):
        make_head(world, alignment_weight=0.0, matching_weight=0.0, distill_weight=0.0)
    with pytest.raises(InputError, match="first 5 steps"):
        make_head(world, alignment_weight=0.0, matching_weight=0.0, distill_after_steps=5)
    with pytest.raises(InputError, match="student_input"):
        make_head(world, student_input="both")


def test_modes_padding_and_global_token(world):
    head = make_head(world).eval()
    split = sample(world, 4)
    assert head.modes == {"student": "embedding", "teacher": "interaction"}
    with torch.no_grad():
        img, txt = head.encode_images(split.images), head.encode_texts(split.texts)
        padded_img = head.encode_images(repad(split.images, extra=7, seed=1))
        assert torch.allclose(img["emb"], padded_img["emb"], atol=1e-5)
        for mode in (None, "student", "teacher"):
            head.set_mode(mode)
            rows = torch.tensor([0, 3, 1]), torch.tensor([6, 2, 7])
            pairs = head.score_pairs(index_encoded(img, rows[0]), index_encoded(txt, rows[1]))
            assert torch.allclose(pairs, head.score(img, txt)[rows], atol=1e-5)
        # the student's global vector is its output at position 0 ([CLS] / image CLS)
        out = head.student.encoder(head.student.text_proj(split.texts.tokens), split.texts.mask)
        assert torch.allclose(txt["emb"], l2norm(out[:, 0]), atol=1e-6)
    no_prefix = FeatureSpec("image", world.image_spec.dim, encoder="synthetic")
    torch.manual_seed(0)
    head = build_head("aladin", no_prefix, world.text_spec, global_pool="mean", **SMALL).eval()
    with torch.no_grad():
        first = head.encode_images(split.images)["emb"]
        shuffled = split.images.tokens.clone()
        shuffled[:, [0, 1]] = shuffled[:, [1, 0]]
        swapped = head.encode_images(TokenBatch(shuffled, split.images.mask))["emb"]
    assert torch.allclose(first, swapped, atol=1e-5)      # mean pooling: order-free


def test_teacher_then_distilled_student_learn(world, tmp_path):
    train, test = sample(world, 200), sample(world, 100)
    options = dict(embed_dim=32, teacher_ff_dim=64, student_ff_dim=32, heads=4)
    teacher = make_head(world, stage="teacher", **options)
    train_head(teacher, train, steps=60)
    teacher_r1 = recall_at_1(teacher, test)
    assert min(teacher_r1.values()) > 40.0, teacher_r1                  # chance is 1 %
    path = write_run(teacher, tmp_path / "teacher.pt")
    student = make_head(world, seed=1, stage="student", teacher_checkpoint=path, **options)
    assert recall_at_1(student, test, "teacher") == teacher_r1
    train_head(student, train, steps=60)
    student_r1 = recall_at_1(student, test)
    assert min(student_r1.values()) > 25.0, student_r1
    assert recall_at_1(student, test, "teacher") == teacher_r1


def test_two_step_recipe_through_the_trainer_and_configs(tmp_path):
    """configs/f8k_aladin_{teacher,student}.yaml on tiny synthetic caches: the student run loads
    the teacher run's best.pt, keeps it frozen and selects on the student branch."""
    from train.config import load_config
    from train.trainer import train
    from tests.heads.synthetic_caches import config_overrides, write_dataset

    features = write_dataset(tmp_path / "features", train=60, dev=20, test=10)
    small = ["head.embed_dim=16", "head.teacher_ff_dim=32", "head.student_ff_dim=16",
             "head.heads=2", "head.dropout=0.0", "head.student_layers=1"]
    common = config_overrides(features, head=None, epochs=2, batch_size=50, lr=0.003,
                              warmup_steps=0, milestones="[]") + small
    teacher_cfg = load_config("configs/f8k_aladin_teacher.yaml", common)
    teacher = train(teacher_cfg, tmp_path / "teacher", show_progress=False)
    assert teacher.history[-1]["scalars"].keys() == {"loss", "alignment"}
    teacher_path = tmp_path / "teacher" / "best.pt"
    student_cfg = load_config("configs/f8k_aladin_student.yaml",
                              common + [f"head.teacher_checkpoint={teacher_path}"])
    assert student_cfg["head"]["stage"] == "student"
    student = train(student_cfg, tmp_path / "student", show_progress=False)
    assert {"matching", "distillation"} <= student.history[-1]["scalars"].keys()
    taught = load_checkpoint(teacher_path)["model"]
    learnt = load_checkpoint(tmp_path / "student" / "last.pt")["model"]
    assert all(torch.equal(v, learnt[k]) for k, v in taught.items() if k.startswith("teacher."))
    assert not all(torch.equal(v, learnt[k]) for k, v in taught.items() if k.startswith("student."))
