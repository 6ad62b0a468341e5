"""Cache-level evaluation: metrics of a split, galleries, pairing checks, protocols."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cache.datasets import check_pairing
from cache.errors import InputError
from heads.eval.metrics import recall_metrics
from heads.eval.scoring import encode_cache
from train.evaluate import evaluate
from tests.heads.eval.eval_world import TinyInteraction, TwoBranch, specs, write_split


def test_evaluate_matches_direct_metrics(split, tmp_path: Path) -> None:
    image, text = split
    head = TwoBranch(*specs(image, text)).train()
    head.set_mode("local")
    result = evaluate(head, image, text, image_block=5, caption_block=4,
                      save_sims=tmp_path / "sims.npz")
    img_enc, txt_enc = encode_cache(head, image, "cpu"), encode_cache(head, text, "cpu")
    with torch.inference_mode():
        direct = head.eval().score(img_enc, txt_enc)
    head.train()
    assert result["metrics"] == recall_metrics(direct, torch.from_numpy(text.image_index))
    assert result["pairs_scored"] == 12 * 36 and result["score_kind"] == "interaction"
    assert set(result["seconds"]) == {"encode", "score", "metrics"}
    assert head.training and head.mode == "local"
    saved = np.load(tmp_path / "sims.npz")
    np.testing.assert_allclose(saved["sims_0"], direct.numpy(), rtol=1e-5, atol=1e-6)
    assert saved["caption_image"].tolist() == text.image_index.tolist()


def test_max_images_evaluates_the_first_images_and_their_captions(split) -> None:
    image, text = split
    head = TinyInteraction(*specs(image, text)).eval()
    result = evaluate(head, image, text, max_images=5, image_block=3, caption_block=4)
    img_enc, txt_enc = encode_cache(head, image, "cpu"), encode_cache(head, text, "cpu")
    with torch.inference_mode():
        direct = head.score(img_enc, txt_enc)
    caption_image = torch.from_numpy(text.image_index).long()
    captions = torch.nonzero(caption_image < 5).squeeze(1)
    assert 0 < captions.numel() < len(text)
    assert result["metrics"] == recall_metrics(direct[:5][:, captions], caption_image[captions])
    assert result["pairs_scored"] == 5 * captions.numel()
    assert evaluate(head, image, text, max_images=100)["pairs_scored"] == 12 * 36
    encoded: list[int] = []
    encode_images = head.encode_images
    head.encode_images = lambda batch: encoded.append(len(batch.tokens)) or encode_images(batch)
    evaluate(head, image, text, max_images=5)
    assert sum(encoded) == 5                    # only the gallery's images are encoded
    with pytest.raises(InputError, match="max_images needs protocol 'full'"):
        evaluate(head, image, text, protocol="coco5k", max_images=5)


def test_pairing_checks_name_both_files(tmp_path: Path) -> None:
    image, _ = write_split(tmp_path / "a", n_img=4, caps_per_image=1)
    _, text = write_split(tmp_path / "b", n_img=6, caps_per_image=1)
    with pytest.raises(InputError, match=r"text-test\.h5 and .*image-test\.h5.*caption row 4 "
                                         r"points to image row 4.*4 images"):
        check_pairing(image, text)
    image, text = write_split(tmp_path / "c", n_img=4, image_index=[0, 0, 1, 3])
    with pytest.raises(InputError, match=r"1 of the 4 images have no caption.*\[2\]"):
        check_pairing(image, text)
    _, other = write_split(tmp_path / "d", n_img=4, caps_per_image=1, split="dev")
    with pytest.raises(InputError, match="not the same split"):
        evaluate(TinyInteraction(*specs(image, other)), image, other)


def test_protocol_needs_coco_size(split) -> None:
    image, text = split
    with pytest.raises(InputError, match="text-test.h5: protocol 'coco1k' needs"):
        evaluate(TinyInteraction(*specs(image, text)), image, text, protocol="coco1k")
