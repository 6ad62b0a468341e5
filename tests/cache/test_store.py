"""Schema round trips, resume and refusal rules of the HDF5 cache store (cache/store.py)."""
from __future__ import annotations

import dataclasses

import h5py
import numpy as np
import pytest

from cache.errors import CacheMismatchError, IncompleteCacheError, InputError
from cache.store import (CacheAttrs, ImageCache, ImageCacheWriter, TextCache, TextCacheWriter,
                         describe, merge_shards, open_cache, partial_path)

N_IMG, T, D = 7, 5, 8


def image_attrs(**over) -> CacheAttrs:
    base = dict(modality="image", encoder="enc", weights_id="w", weights_hash="abc", dim=D,
                num_items=N_IMG, num_tokens=T, prefix_tokens=1, grid=(2, 2), resolution=28,
                preprocessing={"mean": [0.5, 0.5, 0.5]}, dataset="toy", split="test")
    base.update(over)
    return CacheAttrs(**base)


def text_attrs(n: int, **over) -> CacheAttrs:
    base = dict(modality="text", encoder="txt", weights_id="tw", weights_hash="def", dim=D,
                num_items=n, prefix_tokens=1, suffix_tokens=1, dataset="toy", split="test")
    base.update(over)
    return CacheAttrs(**base)


@pytest.fixture()
def image_data():
    rng = np.random.default_rng(0)
    tokens = rng.normal(size=(N_IMG, T, D)).astype(np.float16)
    ids = [f"id{i}" for i in range(N_IMG)]
    paths = [f"img/{i}.jpg" for i in range(N_IMG)]
    return tokens, ids, paths


@pytest.fixture()
def text_data():
    rng = np.random.default_rng(1)
    lengths = [3, 6, 2, 5, 4, 3]
    input_ids = [rng.integers(0, 100, n).tolist() for n in lengths]
    states = [rng.normal(size=(n, D)).astype(np.float16) for n in lengths]
    captions = [f"caption number {i} é" for i in range(len(lengths))]
    image_index = [0, 0, 1, 1, 2, 2]
    return input_ids, states, captions, image_index


def write_images(path, tokens, ids, paths, chunk=3, attrs=None, **kw):
    attrs = attrs or image_attrs()
    with ImageCacheWriter(path, attrs, ids, paths, **kw) as w:
        for s in range(w.rows_written, len(ids), chunk):
            w.append(tokens[s:s + chunk])
        return w.finish()


def test_image_round_trip(tmp_path, image_data):
    tokens, ids, paths = image_data
    out = write_images(tmp_path / "image-enc.h5", tokens, ids, paths)
    assert out.exists() and not partial_path(out).exists()
    cache = open_cache(out)
    assert isinstance(cache, ImageCache)
    assert cache.attrs == image_attrs()
    assert cache.attrs.grid == (2, 2) and cache.attrs.preprocessing == {"mean": [0.5, 0.5, 0.5]}
    assert cache.ids == ids and cache.paths == paths and len(cache) == N_IMG
    rows = [4, 0, 4, 6]
    got, lengths = cache.read(rows)
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, tokens[rows])
    np.testing.assert_array_equal(lengths, [T] * 4)


def test_image_padding_lengths_and_boxes(tmp_path, image_data):
    tokens, ids, paths = image_data
    attrs = image_attrs(grid=None)
    with ImageCacheWriter(tmp_path / "r.h5", attrs, ids, paths, with_boxes=True) as w:
        boxes = np.ones((N_IMG, 3, 4), np.float32)
        w.append(tokens[:, :3], lengths=np.arange(N_IMG) % 3 + 1, boxes=boxes,
                 image_wh=np.full((N_IMG, 2), 10))
        w.finish()
    cache = ImageCache(tmp_path / "r.h5")
    got, lengths = cache.read(np.arange(N_IMG))
    np.testing.assert_array_equal(got[:, :3], tokens[:, :3])
    assert not got[:, 3:].any()
    np.testing.assert_array_equal(lengths, np.arange(N_IMG) % 3 + 1)
    b, wh = cache.read_boxes([2, 1])
    assert b.shape == (2, T, 4) and (b[:, :3] == 1).all() and (wh == 10).all()


def test_text_round_trip(tmp_path, text_data):
    input_ids, states, captions, image_index = text_data
    n = len(captions)
    with TextCacheWriter(tmp_path / "text-txt.h5", text_attrs(n), input_ids, captions,
                         image_index) as w:
        w.append(states[:4])
        w.append(states[4:])
        w.finish()
    cache = open_cache(tmp_path / "text-txt.h5")
    assert isinstance(cache, TextCache)
    assert cache.captions == captions
    np.testing.assert_array_equal(cache.image_index, image_index)
    for i in range(n):
        np.testing.assert_array_equal(cache.input_ids(i), input_ids[i])
    padded, lengths = cache.read([1, 2])
    assert padded.shape == (2, 6, D)
    np.testing.assert_array_equal(padded[0], states[1])
    np.testing.assert_array_equal(padded[1, :2], states[2])
    assert not padded[1, 2:].any()
    np.testing.assert_array_equal(lengths, [6, 2])


def test_partial_until_finished_and_refuses_overwrite(tmp_path, image_data):
    tokens, ids, paths = image_data
    out = tmp_path / "image-enc.h5"
    w = ImageCacheWriter(out, image_attrs(), ids, paths)
    w.append(tokens[:3])
    with pytest.raises(IncompleteCacheError, match="only 3 of 7"):
        w.finish()
    w.close()
    assert partial_path(out).exists() and not out.exists()
    with pytest.raises(InputError, match=r"\.partial"):
        open_cache(out)  # the final name does not exist yet; the message points at the partial file
    write_images(out, tokens, ids, paths)
    with pytest.raises(InputError, match="already exists.*--overwrite"):
        ImageCacheWriter(out, image_attrs(), ids, paths)
    out2 = write_images(out, tokens[::-1].copy(), ids, paths, overwrite=True)
    np.testing.assert_array_equal(ImageCache(out2).read([0])[0][0], tokens[-1])


def test_resume_equals_uninterrupted(tmp_path, image_data):
    tokens, ids, paths = image_data
    full = write_images(tmp_path / "a.h5", tokens, ids, paths)
    with ImageCacheWriter(tmp_path / "b.h5", image_attrs(), ids, paths) as w:
        w.append(tokens[:3])  # then "killed": closed without finish
    with ImageCacheWriter(tmp_path / "b.h5", image_attrs(), ids, paths) as w:
        assert w.rows_written == 3
    resumed = write_images(tmp_path / "b.h5", tokens, ids, paths)
    a, b = ImageCache(full), ImageCache(resumed)
    np.testing.assert_array_equal(a.read(np.arange(N_IMG))[0], b.read(np.arange(N_IMG))[0])


def test_resume_with_other_settings_is_refused(tmp_path, image_data, text_data):
    tokens, ids, paths = image_data
    with ImageCacheWriter(tmp_path / "b.h5", image_attrs(), ids, paths) as w:
        w.append(tokens[:3])
    with pytest.raises(CacheMismatchError, match=r"b\.h5\.partial.*weights_hash"):
        ImageCacheWriter(tmp_path / "b.h5", image_attrs(weights_hash="zzz"), ids, paths)
    with pytest.raises(CacheMismatchError, match="other image ids"):
        ImageCacheWriter(tmp_path / "b.h5", image_attrs(), ids[::-1], paths)
    input_ids, states, captions, image_index = text_data
    with TextCacheWriter(tmp_path / "t.h5", text_attrs(6), input_ids, captions, image_index) as w:
        w.append(states[:2])
    other = [ids_ + [1] for ids_ in input_ids]
    with pytest.raises(CacheMismatchError, match="other captions"):
        TextCacheWriter(tmp_path / "t.h5", text_attrs(6), other, captions, image_index)


def test_non_finite_features_rejected(tmp_path, image_data, text_data):
    tokens, ids, paths = image_data
    bad = tokens.copy()
    bad[4, 2, 1] = np.nan
    with ImageCacheWriter(tmp_path / "n.h5", image_attrs(), ids, paths) as w:
        w.append(tokens[:3])
        with pytest.raises(InputError, match=r"n\.h5\.partial.*rows \[4\]"):
            w.append(bad[3:])
        assert w.rows_written == 3
    input_ids, states, captions, image_index = text_data
    states = list(states)
    states[1] = np.full_like(states[1], np.inf)
    with TextCacheWriter(tmp_path / "t.h5", text_attrs(6), input_ids, captions, image_index) as w:
        with pytest.raises(InputError, match="non-finite"):
            w.append(states[:2])


def test_describe_partial_and_complete(tmp_path, image_data):
    tokens, ids, paths = image_data
    with ImageCacheWriter(tmp_path / "p.h5", image_attrs(), ids, paths) as w:
        w.append(tokens[:3])
    report = describe(partial_path(tmp_path / "p.h5"))
    assert not report["valid"] and not report["complete"] and report["rows_written"] == 3
    assert "3 of 7" in report["problem"]
    done = describe(write_images(tmp_path / "c.h5", tokens, ids, paths))
    assert done["valid"] and done["complete"]
    assert done["datasets"]["tokens"] == {"shape": [N_IMG, T, D], "dtype": "float16"}
    assert done["attributes"]["encoder"] == "enc"
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    assert "not a readable HDF5" in describe(tmp_path / "junk.h5")["problem"]


def test_memmap_reads_equal_h5py(tmp_path, image_data, text_data):
    tokens, ids, paths = image_data
    out = write_images(tmp_path / "m.h5", tokens, ids, paths)
    cache = ImageCache(out)
    assert isinstance(cache.tokens, np.memmap)
    rows = np.array([6, 1, 3, 1])
    with h5py.File(out, "r") as f:
        np.testing.assert_array_equal(cache.read(rows)[0], f["tokens"][np.unique(rows)][[2, 0, 1, 0]])
    input_ids, states, captions, image_index = text_data
    with TextCacheWriter(tmp_path / "t.h5", text_attrs(6), input_ids, captions, image_index) as w:
        w.append(states)
        w.finish()
    text = TextCache(tmp_path / "t.h5")
    with h5py.File(tmp_path / "t.h5", "r") as f:
        np.testing.assert_array_equal(np.asarray(text.tokens), f["tokens"][:])


def test_reader_rejects_wrong_modality_and_requirements(tmp_path, image_data):
    tokens, ids, paths = image_data
    out = write_images(tmp_path / "i.h5", tokens, ids, paths)
    with pytest.raises(CacheMismatchError, match="image cache, expected a text cache"):
        TextCache(out)
    with pytest.raises(CacheMismatchError, match=r"i\.h5: dim is 8, expected 16"):
        ImageCache(out).require(dim=16)


# ------------------------------------------------------------------------------------------ merge


def shard_attrs(base: CacheAttrs, start: int, stop: int) -> CacheAttrs:
    return dataclasses.replace(base, num_items=stop - start, shard_start=start, shard_stop=stop,
                               total_items=base.num_items)


def test_merge_image_and_text_shards_equals_whole(tmp_path, image_data, text_data):
    tokens, ids, paths = image_data
    whole = write_images(tmp_path / "whole.h5", tokens, ids, paths)
    shards = []
    for k, (a, b) in enumerate([(0, 4), (4, 7)]):
        shards.append(write_images(tmp_path / f"s{k}.h5", tokens[a:b], ids[a:b], paths[a:b],
                                   attrs=shard_attrs(image_attrs(), a, b)))
    assert "rows 4..6 of 7" in describe(shards[1])["shard"]
    merged = merge_shards(shards[::-1], tmp_path / "merged.h5", chunk_rows=2)
    m, w = ImageCache(merged), ImageCache(whole)
    assert m.attrs == w.attrs and m.ids == w.ids and m.paths == w.paths
    np.testing.assert_array_equal(np.asarray(m.tokens), np.asarray(w.tokens))

    input_ids, states, captions, image_index = text_data
    parts = []
    for k, (a, b) in enumerate([(0, 1), (1, 6)]):
        with TextCacheWriter(tmp_path / f"t{k}.h5", shard_attrs(text_attrs(6), a, b),
                             input_ids[a:b], captions[a:b], image_index[a:b]) as tw:
            tw.append(states[a:b])
            parts.append(tw.finish())
    merged_t = TextCache(merge_shards(parts, tmp_path / "tm.h5", chunk_rows=2))
    assert merged_t.attrs == text_attrs(6) and merged_t.captions == captions
    np.testing.assert_array_equal(np.asarray(merged_t.tokens), np.concatenate(states))
    np.testing.assert_array_equal(merged_t.image_index, image_index)


def test_merge_rejects_gaps_overlaps_and_foreign_shards(tmp_path, image_data):
    tokens, ids, paths = image_data

    def shard(name, a, b, **over):
        return write_images(tmp_path / name, tokens[a:b], ids[a:b], paths[a:b],
                            attrs=shard_attrs(image_attrs(**over), a, b))

    first, last = shard("a.h5", 0, 3), shard("c.h5", 4, 7)
    with pytest.raises(InputError, match=r"c\.h5: starts at row 4: rows 3\.\.3 are in no shard"):
        merge_shards([first, last], tmp_path / "m.h5")
    with pytest.raises(InputError, match="rows 3..6 are missing"):
        merge_shards([first], tmp_path / "m.h5")
    overlap = shard("b.h5", 2, 7)
    with pytest.raises(InputError, match="overlaps"):
        merge_shards([first, overlap], tmp_path / "m.h5")
    foreign = shard("f.h5", 3, 7, encoder="other")
    with pytest.raises(CacheMismatchError, match=r"f\.h5: shard of a different extraction.*encoder"):
        merge_shards([first, foreign], tmp_path / "m.h5")
    whole = write_images(tmp_path / "w.h5", tokens, ids, paths)
    with pytest.raises(InputError, match=r"w\.h5: not a shard"):
        merge_shards([whole], tmp_path / "m.h5")
    assert not (tmp_path / "m.h5").exists()


def test_a_checkpoint_identity_is_the_producer_part_of_a_file_identity():
    """A resumed file must match its producer and its rows; a checkpoint only the producer (a
    head trained on a cache of several views evaluates on one-view dev and test caches)."""
    assert set(CacheAttrs.FEATURE_FIELDS) < set(CacheAttrs.IDENTITY)
    rows = {"dataset", "split", "num_items", "num_tokens", "shard_start", "shard_stop",
            "total_items"}
    views = {"views", "augmentation"}
    assert set(CacheAttrs.IDENTITY) - set(CacheAttrs.FEATURE_FIELDS) == rows | views | {"modality"}
