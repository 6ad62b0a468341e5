"""The linear baseline head."""
from __future__ import annotations

import torch

from heads.registry import build_head, head_options
from heads.losses import InfoNCELoss
from tests.heads.synthetic_pairs import SyntheticWorld, train_and_recall


def test_options_and_encoding() -> None:
    assert head_options("linear") == {"embed_dim": 512, "use_prefix": True}
    world = SyntheticWorld(seed=1)
    head = build_head("linear", world.image_spec, world.text_spec, embed_dim=8)
    images, texts, _ = world.sample(5)
    img, txt = head.encode_images(images), head.encode_texts(texts)
    assert img["emb"].shape == (5, 8) and txt["emb"].shape == (5, 8)
    assert torch.allclose(img["emb"].norm(dim=1), torch.ones(5), atol=1e-5)
    half = head.encode_texts(type(texts)(texts.tokens.half(), texts.mask))   # caches are fp16
    assert torch.allclose(half["emb"], txt["emb"], atol=1e-2)


def test_use_prefix() -> None:
    world = SyntheticWorld(seed=2)
    images, _, _ = world.sample(4)
    changed = type(images)(images.tokens.clone(), images.mask)
    changed.tokens[:, 0] += 3.0                       # the prefix token (spec.prefix_tokens = 1)
    for use_prefix, same in ((False, True), (True, False)):
        head = build_head("linear", world.image_spec, world.text_spec, embed_dim=8,
                          use_prefix=use_prefix)
        a, b = head.encode_images(images)["emb"], head.encode_images(changed)["emb"]
        assert torch.allclose(a, b, atol=1e-6) == same


def test_learns_synthetic_pairs() -> None:
    world = SyntheticWorld(seed=5)
    head = build_head("linear", world.image_spec, world.text_spec, embed_dim=32)
    recall = train_and_recall(head, InfoNCELoss(), world, steps=150, lr=1e-2)
    assert recall > 0.3, recall                       # chance: 0.01
