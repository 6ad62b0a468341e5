"""The scoring engine: encode once, blockwise scoring, pair scoring, and float32 scores."""
from __future__ import annotations

import torch

from heads.base import EmbeddingHead, Encoded, FeatureSpec, index_encoded
from heads.eval.metrics import clean_scores, i2t_ranks, t2i_ranks
from heads.eval.scoring import encode_cache, inference, score_pairs, similarity_matrix
from heads.registry import build_head
from tests.heads.eval.eval_world import TinyInteraction, interaction_heads, specs


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


def test_gallery_subset_encodings_are_indexed_once(split) -> None:
    image, text = split
    head = TinyInteraction(*specs(image, text))
    img_enc, txt_enc = encode_cache(head, image, "cpu"), encode_cache(head, text, "cpu")
    block = similarity_matrix(head, index_encoded(img_enc, slice(2, 5)),
                              index_encoded(txt_enc, slice(6, 15)), "cpu", 2, 2)
    full = similarity_matrix(head, img_enc, txt_enc, "cpu")
    torch.testing.assert_close(block, full[2:5, 6:15])


class FixedEmbeddings(EmbeddingHead):
    """An embedding head that returns the rows it is given as its embeddings."""

    def __init__(self) -> None:
        spec = FeatureSpec(modality="image", dim=4)
        super().__init__(spec, FeatureSpec(modality="text", dim=4))


def near_ties(n_img: int = 20, n_cap: int = 100, seed: int = 0) -> tuple[Encoded, Encoded]:
    """Unit embeddings whose scores differ by about 1e-4 around 0.99: bf16 (8 mantissa bits)
    rounds many of them to the same value, float32 keeps them apart."""
    g = torch.Generator().manual_seed(seed)
    base = torch.nn.functional.normalize(torch.randn(1, 64, generator=g), dim=1)
    images = torch.nn.functional.normalize(base + 0.01 * torch.randn(n_img, 64, generator=g), dim=1)
    texts = torch.nn.functional.normalize(base + 0.01 * torch.randn(n_cap, 64, generator=g), dim=1)
    return {"emb": images}, {"emb": texts}


def test_scores_are_float32_inside_a_bf16_autocast_region() -> None:
    """Encoders may run under bf16 autocast (CUDA's default, CPU here); the final scores are
    computed in float32 and rank exactly as a float64 reference does."""
    head = FixedEmbeddings()
    images, texts = near_ties()
    caption_image = torch.arange(100) % 20
    reference = images["emb"].double() @ texts["emb"].double().t()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rounded = head.score(images, texts)                      # what bf16 scoring would give
        sims = similarity_matrix(head, images, texts, "cpu")
        pairs = score_pairs(head, images, texts, torch.arange(20), torch.arange(20), "cpu")
    assert rounded.dtype == torch.bfloat16 and sims.dtype == torch.float32
    assert not torch.equal(i2t_ranks(rounded.float(), caption_image),
                           i2t_ranks(reference, caption_image))      # the test can fail
    assert torch.equal(i2t_ranks(sims, caption_image), i2t_ranks(reference, caption_image))
    assert torch.equal(t2i_ranks(sims, caption_image), t2i_ranks(reference, caption_image))
    torch.testing.assert_close(pairs, sims.diagonal())


def test_amp_encodings_come_back_as_float32(split) -> None:
    image, text = split
    head = build_head("vse", *specs(image, text), embed_dim=8)
    plain = encode_cache(head, text, "cpu", amp=False)
    mixed = encode_cache(head, text, "cpu", amp=True)
    assert plain["emb"].dtype == mixed["emb"].dtype == torch.float32
    assert not torch.equal(plain["emb"], mixed["emb"])        # the encoder did run in bf16
    torch.testing.assert_close(mixed["emb"], plain["emb"], atol=0.05, rtol=0.05)


def test_inference_turns_autocast_off_unless_asked() -> None:
    head = FixedEmbeddings()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with inference(head, torch.device("cpu")):
            assert not torch.is_autocast_enabled("cpu")
        with inference(head, torch.device("cpu"), amp=True):
            assert torch.is_autocast_enabled("cpu")


def test_clean_scores_keeps_float64_and_widens_bf16() -> None:
    sims = torch.tensor([[0.5, float("nan")]], dtype=torch.float64) + 1e-12
    assert clean_scores(sims).dtype == torch.float64
    assert clean_scores(sims)[0, 0].item() == 0.5 + 1e-12
    assert clean_scores(sims)[0, 1].item() == float("-inf")
    assert clean_scores(sims.bfloat16()).dtype == torch.float32
