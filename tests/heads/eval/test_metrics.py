"""Recall metrics and protocols against a brute-force NumPy reference (argsort per query)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cache.errors import InputError
from heads.eval.metrics import (METRIC_KEYS, fold, fold_indices, gallery_metrics, i2t_ranks,
                                protocol_subsets, recall_metrics, t2i_ranks)
from tests.heads.eval.eval_world import recalls_of_ranks


def protocol_metrics(sims: torch.Tensor, caption_image: torch.Tensor, protocol: str,
                     source: str = "") -> dict[str, float]:
    """The metrics of ``protocol`` from a whole split's matrix, as ``evaluate`` gets them from the
    matrix of each gallery."""
    subsets = protocol_subsets(sims.shape[0], caption_image, protocol, source)
    return gallery_metrics([sims[images][:, captions] for images, captions in subsets], subsets,
                           caption_image, sims.shape[0])


def reference_ranks(sims: np.ndarray, caption_image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort every query; among equal scores the ground truth goes last (the pessimistic rule)."""
    n_img, n_cap = sims.shape
    i2t = []
    for i in range(n_img):
        gt = caption_image == i
        if not gt.any():
            continue
        order = np.lexsort((gt, -sims[i]))          # by score descending, then GT after non-GT
        i2t.append(int(np.nonzero(gt[order])[0][0]))
    t2i = []
    for j in range(n_cap):
        gt = np.arange(n_img) == caption_image[j]
        order = np.lexsort((gt, -sims[:, j]))
        t2i.append(int(np.nonzero(gt[order])[0][0]))
    return np.array(i2t), np.array(t2i)


def reference_metrics(sims: np.ndarray, caption_image: np.ndarray) -> dict[str, float]:
    return recalls_of_ranks(*reference_ranks(sims, caption_image))


def assert_metrics_equal(got: dict[str, float], want: dict[str, float]) -> None:
    assert set(got) == set(METRIC_KEYS)
    for key in METRIC_KEYS:
        assert got[key] == pytest.approx(want[key], abs=1e-9), key


def correlated(n_img: int, caption_image: np.ndarray, noise: float, seed: int) -> np.ndarray:
    """Random similarities where ground-truth pairs score higher on average (a realistic spread)."""
    rng = np.random.default_rng(seed)
    sims = rng.standard_normal((n_img, len(caption_image))).astype(np.float32) * noise
    sims[caption_image, np.arange(len(caption_image))] += 1.0
    return sims


@pytest.mark.parametrize("noise", [0.3, 0.6, 2.0])
def test_five_captions_per_image_match_reference(noise: float) -> None:
    caption_image = np.repeat(np.arange(40), 5)
    sims = correlated(40, caption_image, noise, seed=1)
    assert_metrics_equal(recall_metrics(torch.from_numpy(sims), torch.from_numpy(caption_image)),
                         reference_metrics(sims, caption_image))


def test_irregular_caption_counts_and_captionless_images() -> None:
    rng = np.random.default_rng(2)
    counts = rng.integers(0, 8, size=30)         # some images have no caption at all
    caption_image = rng.permutation(np.repeat(np.arange(30), counts))
    sims = correlated(30, caption_image, 0.7, seed=3)
    assert_metrics_equal(recall_metrics(torch.from_numpy(sims), torch.from_numpy(caption_image)),
                         reference_metrics(sims, caption_image))


def test_even_number_of_queries_floors_the_median() -> None:
    # t2i ranks 0, 1, 2, 3: numpy median 1.5 -> medr floor(1.5) + 1 = 2 (torch.median would say 1)
    sims = torch.zeros(4, 4)
    sims[0] = 0.5
    for j in range(4):
        sims[1:j + 1, j] = 1.0                  # column j: j wrong images above the right one
    caption_image = torch.tensor([0, 0, 0, 0])
    ranks = t2i_ranks(sims, caption_image)
    assert ranks.tolist() == [0, 1, 2, 3]
    assert recall_metrics(sims, caption_image)["t2i_medr"] == 2.0


def test_ties_are_pessimistic() -> None:
    # image 0 ties its only caption with a wrong one; image 1's two captions tie with each other
    caption_image = torch.tensor([0, 1, 1, 0])
    sims = torch.tensor([[1.0, 1.0, 0.0, 0.3],
                         [0.2, 0.9, 0.9, 0.2]])
    got = recall_metrics(sims, caption_image)
    want = reference_metrics(sims.numpy(), caption_image.numpy())
    assert_metrics_equal(got, want)
    # image 0: its best caption (col 0, 1.0) ties the wrong col 1 -> rank 1, not 0
    # image 1: its captions (cols 1, 2) tie each other at the top -> rank 0
    assert got["i2t_r1"] == 50.0
    # caption 0 (image 0): column [1.0, 0.2] -> rank 0; caption 2 (image 1): [0.0, 0.9] -> 0;
    # caption 1 (image 1) [1.0, 0.9] -> 1; caption 3 (image 0) [0.3, 0.2] -> 0
    assert got["t2i_r1"] == 75.0


def test_constant_scores_rank_last() -> None:
    caption_image = torch.arange(20).repeat_interleave(5)
    got = recall_metrics(torch.zeros(20, 100), caption_image)
    assert got["rsum"] == 0.0
    assert got["t2i_medr"] == 20.0 and got["i2t_medr"] == 96.0   # 95 wrong captions tie first


def test_nan_ranks_last() -> None:
    sims = torch.eye(3).repeat_interleave(2, dim=1)
    sims[1, 2] = float("nan")                   # a ground-truth score of image 1 is NaN
    got = recall_metrics(sims, torch.arange(3).repeat_interleave(2))
    assert got["i2t_r1"] == 100.0               # image 1 still has its other caption at 1.0
    assert got["t2i_r1"] == pytest.approx(500 / 6)


def test_perfect_and_reversed() -> None:
    caption_image = torch.arange(20).repeat_interleave(5)
    perfect = (caption_image[None, :] == torch.arange(20)[:, None]).float()
    assert recall_metrics(perfect, caption_image)["rsum"] == 600.0
    assert recall_metrics(-perfect, caption_image)["i2t_medr"] == 96.0


def test_coco1k_is_the_mean_of_five_explicit_folds() -> None:
    # one caption per image keeps the 5K matrix small; the fold logic does not depend on it
    caption_image = np.arange(5000)
    sims_t = torch.randn(5000, 5000, generator=torch.Generator().manual_seed(4)) * 0.5
    sims_t += 1.2 * torch.eye(5000)
    ci_t = torch.from_numpy(caption_image)
    got = protocol_metrics(sims_t, ci_t, "coco1k")
    folds = [recall_metrics(sims_t[1000 * f:1000 * (f + 1), 1000 * f:1000 * (f + 1)],
                            torch.arange(1000)) for f in range(5)]
    for key in METRIC_KEYS:
        assert got[key] == pytest.approx(np.mean([m[key] for m in folds]), abs=1e-9)
    assert protocol_metrics(sims_t, ci_t, "coco5k") == recall_metrics(sims_t, ci_t)


def test_fold_slicing_with_shuffled_captions() -> None:
    rng = np.random.default_rng(5)
    caption_image = torch.from_numpy(rng.permutation(np.repeat(np.arange(3000), 2)))
    sims = torch.randn(3000, 6000)
    block, local = fold(sims, caption_image, 1)
    images, captions = fold_indices(caption_image, 1)
    assert images.tolist() == list(range(1000, 2000)) and captions.numel() == 2000
    assert torch.equal(block, sims[1000:2000][:, captions])
    assert torch.equal(local + 1000, caption_image[captions])


def test_bad_inputs() -> None:
    with pytest.raises(InputError, match="coco1k.*5000 images"):
        protocol_metrics(torch.zeros(10, 50), torch.arange(10).repeat_interleave(5), "coco1k",
                         source="text.h5")
    with pytest.raises(InputError, match="unknown evaluation protocol"):
        protocol_metrics(torch.zeros(10, 50), torch.arange(10).repeat_interleave(5), "f30k")
    with pytest.raises(InputError, match="caption row 3 points to image row 10"):
        recall_metrics(torch.zeros(10, 4), torch.tensor([0, 1, 2, 10]))
    with pytest.raises(InputError, match="3 caption image indices"):
        recall_metrics(torch.zeros(10, 4), torch.tensor([0, 1, 2]))


def test_float64_scores_are_ranked_without_truncation() -> None:
    """A ground truth ahead by 1e-12 ranks first in float64; truncated to float32 it would tie
    with the negative and the pessimistic rule would rank it second."""
    sims = torch.tensor([[0.5 + 1e-12, 0.5], [0.5, 0.5 + 1e-12]], dtype=torch.float64)
    caption_image = torch.tensor([0, 1])
    assert i2t_ranks(sims, caption_image).tolist() == [0, 0]
    assert t2i_ranks(sims, caption_image).tolist() == [0, 0]
    assert i2t_ranks(sims.float(), caption_image).tolist() == [1, 1]
