"""Warm starts: another run's weights, renamed by prefix, initialise a head."""
from __future__ import annotations

import pytest
import torch

from cache.errors import InputError
from heads.base import FeatureSpec
from heads.checkpoint import warm_start
from heads.models.linear import LinearHead

IMAGE = FeatureSpec("image", 12, prefix_tokens=1)
TEXT = FeatureSpec("text", 8, prefix_tokens=1, suffix_tokens=1)


def _source(embed_dim: int = 16) -> dict:
    """A checkpoint-like state of a head whose projections are called ``vision`` and ``words``."""
    generator = torch.Generator().manual_seed(0)
    model = {"vision.weight": torch.randn(embed_dim, 12, generator=generator),
             "vision.bias": torch.randn(embed_dim, generator=generator),
             "words.weight": torch.randn(embed_dim, 8, generator=generator),
             "words.bias": torch.randn(embed_dim, generator=generator),
             "extra.scale": torch.ones(1)}
    return {"model": model, "head_name": "other", "path": "other/best.pt"}


def test_renamed_weights_initialise_the_head() -> None:
    head = LinearHead(IMAGE, TEXT, embed_dim=16)
    source = _source()
    loaded = warm_start(head, source, {"vision": "image_fc", "words": "text_fc"})
    assert loaded == ["image_fc.bias", "image_fc.weight", "text_fc.bias", "text_fc.weight"]
    assert torch.equal(head.image_fc.weight, source["model"]["vision.weight"])
    assert torch.equal(head.text_fc.bias, source["model"]["words.bias"])


def test_only_the_matching_weights_load() -> None:
    head = LinearHead(IMAGE, TEXT, embed_dim=16)
    text_before = head.text_fc.weight.detach().clone()
    assert warm_start(head, _source(), {"vision": "image_fc"}) == ["image_fc.bias",
                                                                    "image_fc.weight"]
    assert torch.equal(head.text_fc.weight, text_before)


def test_bad_warm_starts_are_named() -> None:
    head = LinearHead(IMAGE, TEXT, embed_dim=16)
    with pytest.raises(InputError, match=r"other/best\.pt.*'vision\.weight'.*\(32, 12\).*image_fc"):
        warm_start(head, _source(embed_dim=32), {"vision": "image_fc"})
    with pytest.raises(InputError, match=r"init\.rename names 'image'"):
        warm_start(head, _source(), {"image": "image_fc"})
    with pytest.raises(InputError, match="no weight .* matches.*init.rename"):
        warm_start(head, _source(), {})
