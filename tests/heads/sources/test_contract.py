"""What every registered token source kind must do, checked for each kind of ``list_sources()``
on both sides of a tiny real backbone pair (DINOv2, BERT; `tests.heads.tail_world`): build from a
cache's recorded backbone, declare what it reads and an epoch unit, hand its reads through
``batches`` (and ``training_reader``) to a ``forward`` whose tokens fit ``output_spec``, make the
same input of a raw photo or caption (``encode_raw``) as of the split's row, keep its tuned
weights through a state round trip, send them a gradient, name the depth of each, and load a run's
tuned state into its export form. Kind-specific behaviour lives in test_tail.py / test_e2e.py."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from backbones.encoders import ImageEncoder, TextEncoder
from backbones.recorded import recorded_encoder
from cache.batch import IdsBatch, InputBatch, PixelBatch, TokenBatch
from cache.errors import InputError
from cache.store import ImageCache, TextCache
from extract.datasets import load_rgb
from heads.base import FeatureSpec
from heads.sources import (EPOCH_UNITS, SourceOptions, TokenSource, build_source, list_sources,
                           source_class)
from tests.heads.tail_world import LAYER, TailWorld, make_tail_world, split_caches

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# The (image, text) cache tags each kind is built from in the tail world: a new kind adds its row.
CASES: dict[str, tuple[str, str]] = {
    "cache": (f"dinov2_l{LAYER}", f"bert_l{LAYER}"),
    "tail": (f"dinov2_l{LAYER}", f"bert_l{LAYER}"),
    "e2e": ("dinov2", "bert"),
}
READS = {"tokens": TokenBatch, "pixels": PixelBatch, "ids": IdsBatch}
ROWS = np.array([3, 0, 2])


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> TailWorld:
    return make_tail_world(tmp_path_factory.mktemp("sources"), num_images=48)


def _cache(world: TailWorld, kind: str, side: str) -> ImageCache | TextCache:
    images, texts = split_caches(world, "test", *CASES[kind])
    return images if side == "image" else texts


def cases() -> list[object]:
    return [pytest.param(kind, side, id=f"{kind}-{side}")
            for kind in list_sources() for side in ("image", "text")]


def _first_batch(source: TokenSource, cache: ImageCache | TextCache) -> InputBatch:
    """The batch of ``ROWS`` as evaluation reads it (float features as the scorer casts them)."""
    (rows, batch), *_ = list(source.batches(cache, len(ROWS), ROWS))
    np.testing.assert_array_equal(rows, ROWS)
    return batch.to("cpu", torch.float32)


def _raw(cache: ImageCache | TextCache, encoder: ImageEncoder | TextEncoder,
         row: int) -> PixelBatch | IdsBatch:
    """Row ``row`` of the split as search and explain see it: a photo file or a caption text,
    preprocessed by the recorded backbone."""
    if cache.attrs.modality == "image":
        photo = Path(cache.attrs.extra["images_root"]) / cache.paths[row]
        return PixelBatch(encoder.transform(load_rgb(photo)).unsqueeze(0))
    ids, mask = encoder.pad_batch(encoder.tokenize([cache.captions[row]]))
    return IdsBatch(ids, mask.bool())


def test_every_registered_source_has_contract_cases() -> None:
    assert sorted(CASES) == sorted(list_sources()), "add the new kind's caches to CASES"


@pytest.mark.parametrize(("kind", "side"), cases())
def test_a_source_builds_from_its_cache_and_declares_what_it_reads(world: TailWorld, kind: str,
                                                                   side: str) -> None:
    cache = _cache(world, kind, side)
    source = build_source(kind, cache)
    assert type(source) is source_class(kind) and source.kind == kind
    assert source.reads in READS and source.epoch_unit in EPOCH_UNITS
    assert source.tuned == any(p.requires_grad for p in source.parameters())
    assert source.tuned == (source.export_note is not None)
    batch = _first_batch(source, cache)
    assert isinstance(batch, READS[source.reads])
    reader = source.training_reader(cache, seed=0)
    assert (reader is None) == (source.reads == "tokens")
    if reader is not None:
        assert isinstance(reader.read(ROWS, 0), READS[source.reads])
    source.check_inputs(cache)
    spec = source.output_spec(FeatureSpec.from_cache(cache))
    with torch.no_grad():
        out = source.eval()(batch)
    assert isinstance(out, TokenBatch) and len(out) == len(ROWS)
    assert out.tokens.shape[-1] == spec.dim
    if side == "image":
        assert out.tokens.shape[1] == spec.num_tokens
    assert torch.all(out.tokens[~out.mask] == 0), "padding positions must be zero"


@pytest.mark.parametrize(("kind", "side"), cases())
def test_encode_raw_gives_what_the_split_gives(world: TailWorld, kind: str, side: str) -> None:
    """A photo or caption given raw (search, explain) reaches the head as its cached row does
    (eval), to the fp16 rounding of a cache."""
    cache = _cache(world, kind, side)
    source = build_source(kind, cache).eval()
    encoder = recorded_encoder(side, cache.attrs, str(cache.path))
    row = int(ROWS[0])
    with torch.no_grad():
        raw = source(source.encode_raw(_raw(cache, encoder, row), encoder))
        split = source(_first_batch(source, cache))
    length = int(split.mask[0].sum())
    assert raw.tokens.shape[1] == length and bool(raw.mask.all())
    np.testing.assert_allclose(raw.tokens[0].numpy(), split.tokens[0, :length].numpy(),
                               atol=3e-2, rtol=1e-2)


@pytest.mark.parametrize(("kind", "side"), cases())
def test_tuned_weights_round_trip_train_and_have_depths(world: TailWorld, kind: str,
                                                        side: str) -> None:
    cache = _cache(world, kind, side)
    source = build_source(kind, cache, SourceOptions(text_augment=0.0))
    names = [n for n, p in source.named_parameters() if p.requires_grad]
    depths = source.layer_depths(names)
    assert sorted(depths) == sorted(names)
    assert all(isinstance(d, int) and d >= 0 for d in depths.values())
    if not source.tuned:
        return
    batch = _first_batch(source, cache)
    source.train()(batch).tokens.square().sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in source.parameters())
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.01)
        expected = source.eval()(batch).tokens
    again = build_source(kind, cache)
    again.load_state_dict(source.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(batch).tokens, expected)


@pytest.mark.parametrize(("kind", "side"), cases())
def test_export_form_takes_the_tuned_state_into_the_backbone(world: TailWorld, kind: str,
                                                             side: str) -> None:
    cache = _cache(world, kind, side)
    cls = source_class(kind)
    features = {"layer": cache.attrs.layer}
    encoder = recorded_encoder(side, cache.attrs, str(cache.path),
                               layer=cls.export_layer(features))
    if cls.export_note is None:
        with pytest.raises(InputError, match="no backbone to export"):
            cls.for_export(encoder, str(cache.path))
        return
    assert cls.export_note.format(**features)
    exported = cls.for_export(encoder, str(cache.path))
    owned = {id(t) for t in encoder.model.state_dict(keep_vars=True).values()}
    state = exported.state_dict(keep_vars=True)
    assert state and all(id(t) in owned for t in state.values())
    exported.load_state_dict(build_source(kind, cache).state_dict())
