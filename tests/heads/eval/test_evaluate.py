"""The scoring engine and cache-level evaluation: encode once, blockwise scoring, checks."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from cache.batch import TokenBatch
from cache.errors import InputError
from cache.store import (CacheAttrs, ImageCache, ImageCacheWriter, TextCache, TextCacheWriter)
from heads.registry import build_head, list_heads
from heads.base import Encoded, FeatureSpec, Head, InteractionHead, index_encoded
from heads.eval.evaluate import check_pairing, evaluate
from heads.layers import l2norm
from heads.eval.metrics import recall_metrics
from heads.eval.scoring import encode_cache, score_pairs, similarity_matrix

IMG_DIM, TXT_DIM, REGIONS = 16, 12, 6


def write_split(root: Path, n_img: int = 12, caps_per_image: int = 3, seed: int = 0,
                image_index: list[int] | None = None, split: str = "test") -> tuple[ImageCache, TextCache]:
    """A small image cache (variable region counts) and a text cache (variable lengths) whose
    captions are noisy copies of their image's first tokens (through a fixed random map)."""
    rng = np.random.default_rng(seed)
    tokens = rng.standard_normal((n_img, REGIONS, IMG_DIM)).astype(np.float32)
    lengths = rng.integers(2, REGIONS + 1, size=n_img)
    img_attrs = CacheAttrs(modality="image", encoder="synthetic", weights_id="none",
                           weights_hash="0", dim=IMG_DIM, num_items=n_img, num_tokens=REGIONS,
                           dataset="syn", split=split)
    img_path = root / f"image-{split}.h5"
    with ImageCacheWriter(img_path, img_attrs, [str(i) for i in range(n_img)],
                          [f"{i}.jpg" for i in range(n_img)]) as w:
        w.append(tokens, lengths)
        w.finish()
    index = (np.repeat(np.arange(n_img), caps_per_image) if image_index is None
             else np.asarray(image_index))
    mix = rng.standard_normal((IMG_DIM, TXT_DIM)).astype(np.float32) / 4
    states = []
    for c, i in enumerate(index):
        n = int(rng.integers(2, 8))
        base = tokens[i, rng.integers(0, lengths[i], size=n)] @ mix
        states.append(base + 0.3 * rng.standard_normal((n, TXT_DIM)).astype(np.float32))
    txt_attrs = CacheAttrs(modality="text", encoder="synthetic", weights_id="none",
                           weights_hash="0", dim=TXT_DIM, num_items=len(index), dataset="syn",
                           split=split)
    txt_path = root / f"text-{split}.h5"
    with TextCacheWriter(txt_path, txt_attrs, [list(range(len(s))) for s in states],
                         [f"caption {c}" for c in range(len(index))], index) as w:
        w.append(states)
        w.finish()
    return ImageCache(img_path), TextCache(txt_path)


class TinyInteraction(InteractionHead):
    """Mean over words of the best region cosine, after a text projection (``score`` is the base
    class's all-pairs default, built on ``score_pairs``)."""

    def __init__(self, image_spec: FeatureSpec, text_spec: FeatureSpec) -> None:
        super().__init__(image_spec, text_spec)
        self.proj = nn.Linear(text_spec.dim, image_spec.dim)

    def encode_images(self, batch: TokenBatch) -> Encoded:
        return {"tokens": l2norm(batch.tokens), "mask": batch.mask}

    def encode_texts(self, batch: TokenBatch) -> Encoded:
        return {"tokens": l2norm(self.proj(batch.tokens)), "mask": batch.mask}

    def score_pairs(self, images: Encoded, texts: Encoded) -> Tensor:
        sims = texts["tokens"] @ images["tokens"].transpose(1, 2)          # [P, W, R]
        sims = sims.masked_fill(~images["mask"].unsqueeze(1), float("-inf")).amax(dim=2)
        words = texts["mask"].float()
        return (sims.masked_fill(~texts["mask"], 0) * words).sum(1) / words.sum(1)


class TwoBranch(TinyInteraction):
    """A head with a global embedding branch and a local interaction branch (like TGDT)."""

    modes = {"global": "embedding", "local": "interaction"}

    def encode_images(self, batch: TokenBatch) -> Encoded:
        out = super().encode_images(batch)
        return {**out, "emb": l2norm((out["tokens"] * out["mask"].unsqueeze(-1)).sum(1))}

    def encode_texts(self, batch: TokenBatch) -> Encoded:
        out = super().encode_texts(batch)
        return {**out, "emb": l2norm((out["tokens"] * out["mask"].unsqueeze(-1)).sum(1))}

    def score(self, images: Encoded, texts: Encoded) -> Tensor:
        if self.score_kind == "embedding":
            return images["emb"] @ texts["emb"].t()
        return super().score(images, texts)

    def score_pairs(self, images: Encoded, texts: Encoded) -> Tensor:
        if self.score_kind == "embedding":
            return (images["emb"] * texts["emb"]).sum(-1)
        return super().score_pairs(images, texts)


def specs(image: ImageCache, text: TextCache) -> tuple[FeatureSpec, FeatureSpec]:
    return FeatureSpec.from_cache(image), FeatureSpec.from_cache(text)


def interaction_heads(image: ImageCache, text: TextCache) -> list[Head]:
    """The tiny test head, plus helper-4's SCAN where it is registered (a real vectorised head)."""
    torch.manual_seed(0)
    heads: list[Head] = [TinyInteraction(*specs(image, text))]
    if "scan" in list_heads():
        heads.append(build_head("scan", *specs(image, text), embed_dim=8))
    return heads


@pytest.fixture()
def split(tmp_path: Path) -> tuple[ImageCache, TextCache]:
    return write_split(tmp_path)


def test_encode_cache_is_batch_independent_and_restores_train_mode(split) -> None:
    image, text = split
    head = TinyInteraction(*specs(image, text)).train()
    small = encode_cache(head, text, "cpu", batch_size=5)
    whole = encode_cache(head, text, "cpu", batch_size=1000)
    assert head.training
    assert small["tokens"].shape[0] == len(text) and not small["tokens"].requires_grad
    assert torch.equal(small["mask"], whole["mask"])
    valid = small["mask"]                       # padding differs with the batch's longest row
    torch.testing.assert_close(small["tokens"][valid], whole["tokens"][valid])


def test_interaction_blocks_equal_full_score(split) -> None:
    image, text = split
    for head in interaction_heads(image, text):
        img_enc, txt_enc = encode_cache(head, image, "cpu"), encode_cache(head, text, "cpu")
        with torch.inference_mode():
            full = head.eval().score(img_enc, txt_enc)
        for image_block, caption_block in [(3, 5), (5, 7), (12, 36), (100, 100)]:
            sims = similarity_matrix(head, img_enc, txt_enc, "cpu", image_block, caption_block)
            assert sims.dtype == torch.float32 and sims.shape == (12, 36)
            torch.testing.assert_close(sims, full, rtol=1e-5, atol=1e-5)


def test_score_pairs_matches_the_matrix(split) -> None:
    image, text = split
    for head in interaction_heads(image, text):
        img_enc, txt_enc = encode_cache(head, image, "cpu"), encode_cache(head, text, "cpu")
        sims = similarity_matrix(head, img_enc, txt_enc, "cpu")
        rows = torch.tensor([0, 11, 3, 3, 7])
        cols = torch.tensor([35, 0, 9, 10, 7])
        got = score_pairs(head, img_enc, txt_enc, rows, cols, "cpu", pair_batch=2)
        torch.testing.assert_close(got, sims[rows, cols], rtol=1e-5, atol=1e-5)


def test_embedding_branch_is_a_matrix_product(split) -> None:
    image, text = split
    head = build_head("vse", *specs(image, text), embed_dim=8)
    img_enc, txt_enc = encode_cache(head, image, "cpu"), encode_cache(head, text, "cpu")
    sims = similarity_matrix(head, img_enc, txt_enc, "cpu", image_block=1, caption_block=1)
    torch.testing.assert_close(sims, img_enc["emb"] @ txt_enc["emb"].t())


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


def test_gallery_subset_encodings_are_indexed_once(split) -> None:
    image, text = split
    head = TinyInteraction(*specs(image, text))
    img_enc, txt_enc = encode_cache(head, image, "cpu"), encode_cache(head, text, "cpu")
    block = similarity_matrix(head, index_encoded(img_enc, slice(2, 5)),
                              index_encoded(txt_enc, slice(6, 15)), "cpu", 2, 2)
    full = similarity_matrix(head, img_enc, txt_enc, "cpu")
    torch.testing.assert_close(block, full[2:5, 6:15])
