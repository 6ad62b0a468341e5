"""The VSE∞ head (GPO pooling itself is checked against its formula in test_layers)."""
from __future__ import annotations

import dataclasses

import torch

from heads.registry import build_head, head_options
from heads.layers import ResidualMLPProjection
from heads.losses import HingeLoss
from tests.heads.synthetic_pairs import SyntheticWorld, repad, train_and_recall


def test_options_and_image_projection_choice() -> None:
    assert head_options("vse") == {"embed_dim": 1024, "image_mlp": None, "mlp_hidden": None,
                                   "gpo_dim": 32, "use_prefix": True}
    world = SyntheticWorld(seed=1)
    region = build_head("vse", world.image_spec, world.text_spec, embed_dim=8)
    assert isinstance(region.image_proj, ResidualMLPProjection)
    grid_spec = dataclasses.replace(world.image_spec, grid=(4, 4))
    grid = build_head("vse", grid_spec, world.text_spec, embed_dim=8)
    assert isinstance(grid.image_proj, torch.nn.Linear)
    forced = build_head("vse", grid_spec, world.text_spec, embed_dim=8, image_mlp=True, mlp_hidden=6)
    assert isinstance(forced.image_proj, ResidualMLPProjection)
    assert forced.image_proj.mlp_in.out_features == 6


def test_padding_invariance_train_and_eval() -> None:
    world = SyntheticWorld(seed=2)
    head = build_head("vse", world.image_spec, world.text_spec, embed_dim=8)
    images, texts, _ = world.sample(6)
    for train in (True, False):          # train mode: BatchNorm statistics over valid tokens only
        head.train(train)
        with torch.no_grad():
            scores = head.score(head.encode_images(images), head.encode_texts(texts))
            padded = head.score(head.encode_images(repad(images, 4)),
                                head.encode_texts(repad(texts, 7)))
        assert torch.allclose(scores, padded, atol=1e-5), train


def test_use_prefix() -> None:
    world = SyntheticWorld(seed=3)
    images, _, _ = world.sample(4)
    changed = type(images)(images.tokens.clone(), images.mask)
    changed.tokens[:, 0] += 3.0
    head = build_head("vse", world.image_spec, world.text_spec, embed_dim=8, use_prefix=False).eval()
    with torch.no_grad():
        assert torch.allclose(head.encode_images(images)["emb"], head.encode_images(changed)["emb"])


def test_learns_synthetic_pairs() -> None:
    world = SyntheticWorld(seed=5)
    head = build_head("vse", world.image_spec, world.text_spec, embed_dim=32)
    recall = train_and_recall(head, HingeLoss(reduction="mean"), world, steps=150, lr=3e-3)
    assert recall > 0.3, recall                       # chance: 0.01
