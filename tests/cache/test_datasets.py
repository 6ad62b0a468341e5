"""The caption-indexed pair loader: epoch order, batch contents, padding invariance, token drop,
the view of each photo read from a cache of several views."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from cache.datasets import (EpochBatches, PairBatches, TokenDrop, caption_batches,
                            one_caption_per_image, pair_loader, resolve_preload, split_bytes,
                            view_of)
from cache.errors import InputError
from cache.store import ImageCache, ImageCacheWriter, TextCache
from tests.heads.synthetic_caches import write_split

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def caches(tmp_path_factory: pytest.TempPathFactory) -> tuple[ImageCache, TextCache]:
    root = tmp_path_factory.mktemp("features")
    image_path, text_path = write_split(root, "train", 30)
    write_split(root, "dev", 8)
    return ImageCache(image_path), TextCache(text_path)


def _valid(batch: object, row: int) -> torch.Tensor:
    tokens, mask = batch.tokens, batch.mask  # type: ignore[attr-defined]
    return tokens[row][mask[row]]


def test_epoch_visits_every_caption_once_and_ranks_split_global_batches() -> None:
    batches = caption_batches(103, 10, seed=3, epoch=0)
    rows = np.concatenate(batches)
    assert len(batches) == 10 and all(len(b) == 10 for b in batches)   # last partial dropped
    assert len(np.unique(rows)) == 100 and rows.max() < 103
    assert [b.tolist() for b in caption_batches(103, 10, 3, 0)] == [b.tolist() for b in batches]
    assert not np.array_equal(np.concatenate(caption_batches(103, 10, 3, 1)), rows)
    halves = [caption_batches(103, 10, 3, 0, rank=r, world_size=2) for r in (0, 1)]
    for step, global_rows in enumerate(batches):
        np.testing.assert_array_equal(np.concatenate([halves[0][step], halves[1][step]]),
                                      global_rows)
    with pytest.raises(InputError, match="not divisible"):
        caption_batches(100, 10, 0, 0, world_size=3)
    with pytest.raises(InputError, match="fewer than one batch"):
        caption_batches(5, 10, 0, 0)


def test_an_epoch_over_images_takes_one_random_caption_of_each() -> None:
    caption_image = np.repeat(np.arange(40), 5)[np.random.default_rng(0).permutation(200)]
    picked = one_caption_per_image(caption_image, seed=1, epoch=0)
    np.testing.assert_array_equal(caption_image[picked], np.arange(40))       # every image once
    epochs = np.stack([one_caption_per_image(caption_image, 1, e) for e in range(50)])
    assert len(np.unique(epochs)) > 150               # over epochs the captions vary: all 5 of each
    batches = caption_batches(200, 8, 1, 0, caption_image=caption_image)
    assert len(batches) == 5 and sorted(caption_image[np.concatenate(batches)]) == list(range(40))
    sampler = EpochBatches(200, 8, 1, caption_image=caption_image)
    assert len(sampler) == 5 and len(list(sampler)) == 5
    with pytest.raises(InputError, match="has 40 images, fewer than one batch of 64"):
        caption_batches(200, 64, 0, 0, caption_image=caption_image)


def test_readers_replace_a_sides_cached_tokens(caches: tuple[ImageCache, TextCache]) -> None:
    images, texts = caches

    class Rows:
        def read(self, rows: np.ndarray, epoch: int) -> tuple[list[int], int]:
            return rows.tolist(), epoch

    dataset = PairBatches(images, texts, readers={"text": Rows(), "image": None})
    image_batch, text_batch, image_rows = dataset[(3, np.array([4, 1, 7]))]
    assert text_batch == ([4, 1, 7], 3)
    assert image_batch.tokens.shape[0] == 3
    np.testing.assert_array_equal(image_rows.numpy(), np.asarray(texts.image_index)[[4, 1, 7]])


def test_pairs_hold_each_caption_with_its_image(caches: tuple[ImageCache, TextCache]) -> None:
    images, texts = caches
    data = PairBatches(images, texts, seed=0)
    rows = np.array([7, 3, 8, 40, 2])          # 7, 8 and 9 share image 1; unsorted on purpose
    img, txt, image_ids = data[(0, rows)]
    np.testing.assert_array_equal(image_ids.numpy(), texts.image_index[rows])
    ref_img, ref_img_len = images.read(texts.image_index[rows])
    ref_txt, ref_txt_len = texts.read(rows)
    np.testing.assert_array_equal(img.lengths.numpy(), ref_img_len)
    np.testing.assert_array_equal(txt.lengths.numpy(), ref_txt_len)
    for i in range(len(rows)):
        np.testing.assert_array_equal(_valid(img, i).numpy(), ref_img[i, :ref_img_len[i]])
        np.testing.assert_array_equal(_valid(txt, i).numpy(), ref_txt[i, :ref_txt_len[i]])
    assert img.tokens.dtype == torch.float16 and img.tokens.shape[1] == ref_img_len.max()
    assert not img.tokens[~img.mask].any() and not txt.tokens[~txt.mask].any()


@pytest.mark.parametrize("drop", [0.0, 0.5])
def test_a_captions_tokens_do_not_depend_on_the_batch(caches: tuple[ImageCache, TextCache],
                                                      drop: float) -> None:
    images, texts = caches
    data = PairBatches(images, texts, seed=5, image_drop=drop, text_drop=drop)
    order = np.argsort(texts.lengths, kind="stable")
    short, long_, target = int(order[0]), int(order[-1]), int(order[len(order) // 2])
    alone = data[(2, np.array([target]))]
    for rows in ([target, short], [long_, target], [short, long_, target, 11]):
        batch = data[(2, np.array(rows))]
        i = rows.index(target)
        for side in (0, 1):
            assert torch.equal(_valid(batch[side], i), _valid(alone[side], 0))


def test_token_drop_keeps_prefix_and_suffix_tokens(caches: tuple[ImageCache, TextCache]) -> None:
    images, texts = caches
    data = PairBatches(images, texts, seed=1, image_drop=0.9, text_drop=0.9)
    rows = np.arange(len(texts))
    img, txt, _ = data[(0, rows)]
    ref_img, ref_img_len = images.read(texts.image_index[rows])
    ref_txt, ref_txt_len = texts.read(rows)
    assert (img.lengths < torch.from_numpy(ref_img_len)).float().mean() > 0.9
    assert (txt.lengths < torch.from_numpy(ref_txt_len)).float().mean() > 0.9
    assert (img.lengths >= 2).all() and (txt.lengths >= 3).all()   # prefix (+ suffix) + >= 1 kept
    for i in range(len(rows)):
        n = int(txt.lengths[i])
        np.testing.assert_array_equal(txt.tokens[i, 0].numpy(), ref_txt[i, 0])              # [CLS]
        np.testing.assert_array_equal(txt.tokens[i, n - 1].numpy(), ref_txt[i, ref_txt_len[i] - 1])
        np.testing.assert_array_equal(img.tokens[i, 0].numpy(), ref_img[i, 0])              # prefix
    # kept tokens keep their order: each kept token appears in the original caption after the last
    kept = _valid(txt, 4).numpy()
    original = ref_txt[4, :ref_txt_len[4]]
    positions = [int(np.nonzero((original == tok).all(1))[0][0]) for tok in kept]
    assert positions == sorted(positions)


def test_token_drop_rule() -> None:
    drop = TokenDrop(p=0.99, prefix=1, suffix=1)
    order, lengths = drop.keep_order(np.array([6, 3, 2]), (0, 0, 2, np.arange(3)), 6)
    np.testing.assert_array_equal(lengths, [3, 3, 2])  # one word always stays
    assert order[0, 0] == 0 and order[0, 2] == 5 and order[1].tolist()[:3] == [0, 1, 2]
    assert TokenDrop(0.0).keep_order(np.array([4, 2]), (0,), 4)[1].tolist() == [4, 2]
    with pytest.raises(InputError):
        TokenDrop(1.0)


def test_drop_is_deterministic_per_seed_and_epoch(caches: tuple[ImageCache, TextCache]) -> None:
    images, texts = caches
    rows = np.arange(0, 60, 3)

    def lengths(seed: int, epoch: int) -> list[int]:
        data = PairBatches(images, texts, seed=seed, image_drop=0.3, text_drop=0.3)
        img, txt, _ = data[(epoch, rows)]
        return img.lengths.tolist() + txt.lengths.tolist()

    assert lengths(0, 0) == lengths(0, 0)
    assert lengths(0, 0) != lengths(0, 1) and lengths(0, 0) != lengths(1, 0)


def test_preload_ram_equals_memmap_reads(caches: tuple[ImageCache, TextCache]) -> None:
    images, texts = caches
    rows = np.array([5, 0, 77, 31, 12, 13])
    read = PairBatches(images, texts, seed=2, image_drop=0.2, text_drop=0.2)[(1, rows)]
    held = PairBatches(images, texts, seed=2, image_drop=0.2, text_drop=0.2, preload="ram")[(1, rows)]
    for a, b in zip(read[:2], held[:2]):
        assert torch.equal(a.tokens, b.tokens)
        assert torch.equal(a.mask, b.mask)
    assert torch.equal(read[2], held[2])


def test_workers_reopen_the_memmap_and_give_the_same_batches(
        caches: tuple[ImageCache, TextCache]) -> None:
    images, texts = caches
    data = PairBatches(images, texts, seed=0, image_drop=0.2, text_drop=0.2)

    def epoch(workers: int) -> list[torch.Tensor]:
        sampler = EpochBatches(len(texts), 16, seed=0)
        sampler.set_epoch(1)
        return [txt.tokens for _, txt, _ in pair_loader(data, sampler, num_workers=workers)]

    single, parallel = epoch(0), epoch(2)
    assert len(single) == len(texts) // 16
    for a, b in zip(single, parallel):
        assert torch.equal(a, b)


def test_captions_of_another_split_are_an_error(caches: tuple[ImageCache, TextCache]) -> None:
    images, texts = caches
    dev_images = ImageCache(Path(str(images.path).replace("/train/", "/dev/")))
    with pytest.raises(InputError, match=str(texts.path)):
        PairBatches(dev_images, texts)


def test_preload_choice(caches: tuple[ImageCache, TextCache]) -> None:
    images, texts = caches
    cpu = torch.device("cpu")
    assert resolve_preload("device", images, texts, cpu)[0] == "ram"
    assert resolve_preload("auto", images, texts, cpu)[0] == "ram"     # a few KiB fit
    assert resolve_preload("none", images, texts, cpu)[0] == "none"
    with pytest.raises(InputError, match="preload"):
        resolve_preload("gpu", images, texts, cpu)


# ------------------------------------------------------------------------------ views


def test_each_epoch_takes_another_view_of_each_photo() -> None:
    rows = np.arange(200)
    epochs = np.stack([view_of(5, epoch, rows, 4) for epoch in range(4)])
    assert (np.sort(epochs, axis=0) == np.arange(4)[:, None]).all()  # all 4 views in 4 epochs
    assert (epochs[1] != epochs[0]).all()                             # another one each epoch
    assert len(np.unique(epochs[0])) == 4                             # photos out of step
    np.testing.assert_array_equal(view_of(5, 2, rows, 4), epochs[2])
    assert not np.array_equal(view_of(6, 0, rows, 4), epochs[0])      # per seed
    np.testing.assert_array_equal(view_of(5, 3, rows, 1), np.zeros(200))


@pytest.fixture(scope="module")
def views_cache(caches: tuple[ImageCache, TextCache], tmp_path_factory) -> ImageCache:
    """The train image cache with 3 views per photo: view v = the tokens + v (padding too)."""
    images, _ = caches
    tokens, lengths = images.read(np.arange(len(images)))
    attrs = dataclasses.replace(images.attrs, views=3, augmentation={"seed": 0})
    path = tmp_path_factory.mktemp("views") / "image-views.h5"
    with ImageCacheWriter(path, attrs, images.ids, images.paths) as writer:
        writer.append(tokens, lengths, views=np.stack([tokens + 1, tokens + 2], axis=1))
        writer.finish()
    return ImageCache(path)


@pytest.mark.parametrize("preload", ["none", "ram"])
def test_training_reads_the_view_of_the_epoch(caches: tuple[ImageCache, TextCache],
                                              views_cache: ImageCache, preload: str) -> None:
    images, texts = caches
    data = PairBatches(views_cache, texts, seed=4, preload=preload)
    rows = np.array([7, 3, 8, 40, 2, 9])        # 7, 8 and 9 share image 1
    seen = []
    for epoch in range(3):
        batch, _, image_rows = data[(epoch, rows)]
        views = view_of(4, epoch, image_rows.numpy(), 3)
        centre, _ = images.read(image_rows.numpy())
        for i, (row, view) in enumerate(zip(image_rows.tolist(), views)):
            n = int(images.lengths[row])
            expected = torch.from_numpy(centre[i, :n].astype(np.float32) + view)
            torch.testing.assert_close(_valid(batch, i).float(), expected.half().float())
        assert len(set(views[[0, 2, 5]])) == 1  # one view per photo in an epoch
        seen.append(views)
    assert (np.sort(np.stack(seen), axis=0) == np.arange(3)[:, None]).all()


def test_preload_counts_every_view(caches: tuple[ImageCache, TextCache],
                                   views_cache: ImageCache) -> None:
    images, texts = caches
    assert split_bytes(views_cache, texts) - split_bytes(images, texts) == \
        2 * int(np.prod(images.tokens.shape)) * 2
