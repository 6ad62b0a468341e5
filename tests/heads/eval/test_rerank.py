"""Two-stage retrieval: shortlist ranks against a brute-force ordering, the miss rule, k = N."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

from cache.errors import InputError
from heads.eval.metrics import recall_metrics
from heads.eval.rerank import parse_topk, rerank
from heads.registry import build_head
from train.evaluate import evaluate, two_stage
from tests.heads.eval.eval_world import TwoBranch, recalls_of_ranks, specs, write_split


def lookup(fine: Tensor):
    """A fine scorer reading a precomputed matrix (so tests control every fine score)."""
    return lambda image_rows, caption_rows: fine[image_rows, caption_rows]


def reference_ranks(coarse: np.ndarray, fine: np.ndarray, caption_image: np.ndarray, k_i2t: int,
                    k_t2i: int, weight: float) -> tuple[np.ndarray, np.ndarray]:
    """Build every query's full ranking explicitly: the shortlist by fused score, then the rest by
    coarse score; ground truths go after equal scores (the pessimistic rule)."""
    def first_gt(scores_c: np.ndarray, scores_f: np.ndarray, gt: np.ndarray, k: int) -> int:
        top = np.argsort(-scores_c, kind="stable")[:k]
        rest = np.setdiff1d(np.arange(len(scores_c)), top)
        fused = scores_f[top] + weight * scores_c[top]
        order = np.concatenate([top[np.lexsort((gt[top], -fused))],
                                rest[np.lexsort((gt[rest], -scores_c[rest]))]])
        return int(np.nonzero(gt[order])[0][0])

    n_img = coarse.shape[0]
    i2t = [first_gt(coarse[i], fine[i], caption_image == i, k_i2t) for i in range(n_img)]
    t2i = [first_gt(coarse[:, j], fine[:, j], np.arange(n_img) == caption_image[j], k_t2i)
           for j in range(coarse.shape[1])]
    return np.array(i2t), np.array(t2i)


def random_problem(n_img: int = 30, per_image: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    caption_image = torch.arange(n_img).repeat_interleave(per_image)
    truth = (caption_image.unsqueeze(0) == torch.arange(n_img).unsqueeze(1)).float()
    coarse = truth + 0.8 * torch.randn(n_img, n_img * per_image, generator=g)
    fine = truth + 0.5 * torch.randn(n_img, n_img * per_image, generator=g)
    return coarse, fine, caption_image


@pytest.mark.parametrize("k_i2t,k_t2i,weight", [(7, 3, 0.0), (20, 12, 0.5), (1, 1, 0.0)])
def test_matches_brute_force_ordering(k_i2t: int, k_t2i: int, weight: float) -> None:
    coarse, fine, caption_image = random_problem()
    fine = (fine * 4).round() / 4              # many exact ties inside shortlists
    got = rerank(coarse, caption_image, lookup(fine), k_i2t, k_t2i, weight)
    want = recalls_of_ranks(*reference_ranks(coarse.numpy(), fine.numpy(), caption_image.numpy(),
                                       k_i2t, k_t2i, weight))
    for key, value in want.items():
        assert got["final"][key] == pytest.approx(value, abs=1e-9), key
    assert got["coarse"] == recall_metrics(coarse, caption_image)


def test_a_ground_truth_outside_the_shortlist_is_a_miss() -> None:
    n = 12
    caption_image = torch.arange(n)
    coarse = torch.eye(n) + 0.01 * torch.arange(n).float().unsqueeze(1)
    coarse[0, 0] = -1.0                        # caption 0's image is last in the coarse order
    fine = 10 * torch.eye(n)                   # a perfect fine scorer, if it ever saw the pair
    got = rerank(coarse, caption_image, lookup(fine), k_i2t=3, k_t2i=3)
    # caption 0: rank 11 (coarse position), not 0 as TGDT's code assigns; every other query hits
    assert got["final"]["t2i_r1"] == got["final"]["t2i_r10"] == pytest.approx(100 * 11 / 12)
    assert got["final"]["t2i_meanr"] == pytest.approx((11 + 1 + 11 * 1) / 12)
    # image 0's only caption is also outside its shortlist: coarse rank 11 among 12 captions
    assert got["final"]["i2t_r10"] == pytest.approx(100 * 11 / 12)
    assert got["coarse_recall_at_k"] == {"i2t": pytest.approx(100 * 11 / 12),
                                         "t2i": pytest.approx(100 * 11 / 12)}


def test_k_equal_to_gallery_is_full_fine_scoring() -> None:
    coarse, fine, caption_image = random_problem(seed=1)
    got = rerank(coarse, caption_image, lookup(fine), k_i2t=150, k_t2i=30)
    assert got["final"] == recall_metrics(fine, caption_image)
    assert got["pairs_scored"] == got["pairs_full"] == 30 * 150
    fused = rerank(coarse, caption_image, lookup(fine), 10_000, 10_000, fuse_weight=0.3)
    assert fused["final"] == recall_metrics(fine + 0.3 * coarse, caption_image)
    assert fused["topk"] == {"i2t": 150, "t2i": 30}


def test_perfect_fine_scorer_reaches_the_coarse_recall_at_k() -> None:
    coarse, _, caption_image = random_problem(seed=2)
    truth = (caption_image.unsqueeze(0) == torch.arange(30).unsqueeze(1)).float()
    got = rerank(coarse, caption_image, lookup(truth), k_i2t=4, k_t2i=4)
    assert got["final"]["i2t_r1"] == pytest.approx(got["coarse_recall_at_k"]["i2t"])
    assert got["final"]["t2i_r1"] == pytest.approx(got["coarse_recall_at_k"]["t2i"])
    assert got["final"]["t2i_r1"] < 100.0       # the coarse stage misses some: a real ceiling
    for d in ("i2t", "t2i"):
        assert got["final"][f"{d}_r1"] >= got["coarse"][f"{d}_r1"]


def test_coarse_recall_at_k_against_numpy() -> None:
    coarse, fine, caption_image = random_problem(seed=3)
    got = rerank(coarse, caption_image, lookup(fine), k_i2t=6, k_t2i=2)
    c, ci = coarse.numpy(), caption_image.numpy()
    i2t = np.mean([np.isin(np.argsort(-c[i])[:6], np.nonzero(ci == i)[0]).any() for i in range(30)])
    t2i = np.mean([ci[j] in np.argsort(-c[:, j])[:2] for j in range(150)])
    assert got["coarse_recall_at_k"]["i2t"] == pytest.approx(100 * i2t)
    assert got["coarse_recall_at_k"]["t2i"] == pytest.approx(100 * t2i)
    assert got["pairs_scored"] <= 30 * 6 + 150 * 2


def test_each_pair_is_scored_once() -> None:
    coarse, fine, caption_image = random_problem(seed=4)
    seen: list[Tensor] = []

    def counting(image_rows: Tensor, caption_rows: Tensor) -> Tensor:
        seen.append(image_rows * 150 + caption_rows)
        return fine[image_rows, caption_rows]

    got = rerank(coarse, caption_image, counting, k_i2t=20, k_t2i=10)
    keys = torch.cat(seen)
    assert keys.unique().numel() == keys.numel() == got["pairs_scored"]


def test_bad_k() -> None:
    coarse, fine, caption_image = random_problem()
    with pytest.raises(InputError, match="shortlist lengths must be positive"):
        rerank(coarse, caption_image, lookup(fine), 0, 5)


def test_one_head_in_two_modes_on_caches(tmp_path: Path) -> None:
    image, text = write_split(tmp_path)
    torch.manual_seed(0)
    head = TwoBranch(*specs(image, text))
    got = two_stage(head, head, image, text, topk=(36, 12), coarse_mode="global",
                    fine_mode="local", pair_batch=50)
    assert head.mode is None
    assert got["final"] == evaluate(head.set_mode("local"), image, text)["metrics"]
    assert got["coarse"] == evaluate(head.set_mode("global"), image, text)["metrics"]
    assert got["pairs_scored"] == got["pairs_full"] == 12 * 36
    assert set(got["seconds"]) == {"encode", "coarse", "shortlist", "fine", "rank"}
    short = two_stage(head, head, image, text, topk=3, coarse_mode="global", fine_mode="local")
    assert short["pairs_scored"] < 12 * 36 and short["topk"] == {"i2t": 3, "t2i": 3}


def test_embedding_head_then_interaction_head_on_caches(tmp_path: Path) -> None:
    image, text = write_split(tmp_path)
    torch.manual_seed(0)
    coarse = build_head("vse", *specs(image, text), embed_dim=8)
    fine = build_head("scan", *specs(image, text), embed_dim=8)
    full = evaluate(fine, image, text)["metrics"]
    got = two_stage(coarse, fine, image, text, topk=1000)
    assert got["final"] == full
    assert got["coarse"] == evaluate(coarse, image, text)["metrics"]


def test_tgdt_global_shortlist_local_rerank(tmp_path: Path) -> None:
    image, text = write_split(tmp_path)
    torch.manual_seed(0)
    head = build_head("tgdt", *specs(image, text), embed_dim=8, heads=2, ff_dim=16)
    got = two_stage(head, head, image, text, topk=1000, coarse_mode="global", fine_mode="local")
    assert got["final"] == evaluate(head.set_mode("local"), image, text)["metrics"]
    assert got["coarse"] == evaluate(head.set_mode("global"), image, text)["metrics"]


def test_parse_topk() -> None:
    assert parse_topk("50") == (50, 50) and parse_topk("50,100") == (50, 100)
    for bad in ("0", "a", "1,2,3", "-5,4"):
        with pytest.raises(InputError, match="top-k must be"):
            parse_topk(bad)


def _save_head(path: Path, name: str, image, text) -> Path:
    """A train-head style checkpoint of a freshly built head on the synthetic split."""
    from heads.checkpoint import FORMAT_VERSION, feature_identity, save_checkpoint

    torch.manual_seed(0)
    head = build_head(name, *specs(image, text), embed_dim=8)
    save_checkpoint({
        "format": FORMAT_VERSION, "head_name": name, "head_options": {"embed_dim": 8},
        "image_spec": specs(image, text)[0].to_dict(),
        "text_spec": specs(image, text)[1].to_dict(),
        "features": {"image": feature_identity(image), "text": feature_identity(text)},
        "model": head.state_dict(), "epoch": 0, "step": 0,
        "config": {"data": {"test_split": "test", "features": str(path.parent), "dataset": "syn",
                            "image": "synthetic", "text": "synthetic"},
                   "eval": {"protocol": "full", "batch_size": 8}}}, path)
    return path


def test_eval_command_two_stage(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from train.commands import eval_command

    image, text = write_split(tmp_path)
    paths = {name: _save_head(tmp_path / f"{name}.pt", name, image, text) for name in ("vse", "scan")}
    report = tmp_path / "report.json"
    result = CliRunner().invoke(eval_command, [
        "--checkpoint", str(paths["scan"]), "--coarse-checkpoint", str(paths["vse"]),
        "--image-cache", str(image.path), "--text-cache", str(text.path), "--rerank-topk", "5,3",
        "--device", "cpu", "--json", str(report)])
    assert result.exit_code == 0, result.output
    assert "coarse only:" in result.output and "two-stage:" in result.output
    saved = __import__("json").loads(report.read_text())
    assert saved["topk"] == {"i2t": 5, "t2i": 3} and saved["pairs_scored"] < 12 * 36
    assert saved["coarse_checkpoint"] == str(paths["vse"])


def test_eval_command_mode_selects_the_branch(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from train.commands import eval_command

    image, text = write_split(tmp_path)
    checkpoint = _save_head(tmp_path / "tgdt.pt", "tgdt", image, text)
    base = ["--checkpoint", str(checkpoint), "--image-cache", str(image.path), "--text-cache",
            str(text.path), "--device", "cpu"]
    reports = {}
    for mode in ("global", "local"):
        out = tmp_path / f"{mode}.json"
        result = CliRunner().invoke(eval_command, base + ["--mode", mode, "--json", str(out)])
        assert result.exit_code == 0, result.output
        reports[mode] = json.loads(out.read_text())
    assert reports["global"]["mode"] == "global" and reports["global"]["score_kind"] == "embedding"
    assert reports["local"]["mode"] == "local" and reports["local"]["score_kind"] == "interaction"
    assert reports["global"]["metrics"] != reports["local"]["metrics"]
    result = CliRunner().invoke(eval_command, base + ["--coarse-mode", "global"])
    assert result.exit_code != 0 and "add --rerank-topk" in str(result.exception)
    result = CliRunner().invoke(eval_command, base + ["--rerank-topk", "5", "--save-sims",
                                                      str(tmp_path / "sims.npz")])
    assert result.exit_code != 0 and "do not apply to --rerank-topk" in str(result.exception)
    assert not (tmp_path / "sims.npz").exists()
    result = CliRunner().invoke(eval_command, base + ["--rerank-topk", "5", "--max-images", "3"])
    assert result.exit_code != 0 and "do not apply to --rerank-topk" in str(result.exception)
    assert str(result.exception).startswith("--max-images do not")   # names only what was given


def test_unknown_mode_fails_early(tmp_path: Path) -> None:
    image, text = write_split(tmp_path)
    head = TwoBranch(*specs(image, text))
    with pytest.raises(InputError, match="no inference mode 'coarse'"):
        two_stage(head, head, image, text, topk=5, coarse_mode="coarse", fine_mode="local")
