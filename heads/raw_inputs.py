"""Raw inputs of end-to-end token sources: decoded photos and caption word pieces, by cache row.

An ``e2e`` side (``heads.sources.BackboneTokens``) runs the whole backbone, so it reads what stage
one read, not the tokens stage one wrote. The split's caches still say what to read: an image
cache records each row's file (``paths``, under ``extra.images_root`` or ``data.images_root``),
a text cache each caption's word-piece ids (``input_ids``, tokenised at extraction). The tokens
of those caches are not read.

Training augmentation, as in the references (VSE∞, LAPS, CADR, HREM):

* images (`backbones.transforms.training_transform`, also what ``cli extract --views`` draws):
  ``RandomResizedCrop`` to the backbone's resolution, scale (0.6, 1), bicubic, then a
  horizontal flip with probability 0.5 (torchvision.transforms.v2), then the backbone's
  normalisation; evaluation uses the extraction's preprocessing (``encoder.transform``);
* captions (`WordPieceAugment`): each *word* (a piece and the ``##`` pieces after it; never
  [CLS], [SEP]) is perturbed with probability 0.2; a perturbed word has all its pieces replaced
  by [MASK] with probability 0.5, each piece replaced by a uniformly random vocabulary id with
  probability 0.1, or its pieces deleted with probability 0.4 (VSE∞'s code deletes, where its
  comment says "keep"). Per word: 10 % masked, 2 % random, 8 % deleted. The draws depend only on
  (seed, epoch, caption row), not on batches or workers.

Readers run in DataLoader workers (``data.num_workers``): decoding a photo costs more than
reading a cached row.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from cache.batch import IdsBatch, PixelBatch
from cache.errors import InputError
from cache.store import ImageCache, TextCache, recorded_photo_folders
from extract.datasets import load_rgb
from extract.tar_members import photo_exists

WORD_AUGMENT = 0.2
WORD_SPLIT = (0.5, 0.1, 0.4)   # of a perturbed word: [MASK], random pieces, deleted


# ------------------------------------------------------------------------------------- captions


@dataclass(frozen=True)
class WordPieceAugment:
    """Word-level caption perturbation on word-piece ids (see the module docstring).

    ``continuation[id]`` is True for ``##`` pieces; ``keep[id]`` for ids never perturbed
    ([CLS], [SEP], [PAD])."""

    prob: float
    continuation: np.ndarray
    keep: np.ndarray
    mask_id: int
    vocab_size: int

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, prob: float = WORD_AUGMENT) -> WordPieceAugment:
        """The augmentation for a WordPiece (BERT-family) tokenizer."""
        vocab = tokenizer.get_vocab()
        size = max(vocab.values()) + 1
        continuation = np.zeros(size, bool)
        for piece, index in vocab.items():
            continuation[index] = piece.startswith("##")
        keep = np.zeros(size, bool)
        keep[[i for i in tokenizer.all_special_ids if i is not None and i < size]] = True
        if tokenizer.mask_token_id is None:
            raise InputError(f"{type(tokenizer).__name__} has no [MASK] token: word-piece "
                             "augmentation needs one (set data.text_augment=0)")
        return cls(prob, continuation, keep, int(tokenizer.mask_token_id), size)

    def __call__(self, ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Perturbed copy of one caption's ids (special tokens kept in place)."""
        ids = np.asarray(ids, np.int64)
        word_start = ~self.keep[ids] & ~self.continuation[ids]
        word = np.cumsum(word_start) - 1                    # word of each piece (-1: before any)
        in_word = ~self.keep[ids] & (word >= 0)
        num_words = int(word_start.sum())
        perturbed = rng.random(num_words) < self.prob
        action = rng.random(num_words)
        random_ids = rng.integers(0, self.vocab_size, len(ids))
        words = np.where(in_word, word, 0)
        hit = in_word & perturbed[words] if num_words else np.zeros(len(ids), bool)
        choice = action[words] if num_words else np.zeros(len(ids))
        masked, replaced = WORD_SPLIT[0], WORD_SPLIT[0] + WORD_SPLIT[1]
        out = ids.copy()
        out[hit & (choice < masked)] = self.mask_id
        swap = hit & (choice >= masked) & (choice < replaced)
        out[swap] = random_ids[swap]
        return out[~(hit & (choice >= replaced))]


class CaptionIds:
    """Word-piece ids of a text cache's captions, as `IdsBatch`es (``augment``: training)."""

    def __init__(self, texts: TextCache, augment: WordPieceAugment | None = None,
                 seed: int = 0, pad_id: int = 0) -> None:
        self.texts, self.augment, self.seed, self.pad_id = texts, augment, seed, pad_id

    def read(self, rows: Sequence[int] | np.ndarray, epoch: int = 0) -> IdsBatch:
        """The captions of ``rows`` (perturbed when augmenting), right-padded."""
        captions = []
        for row in np.asarray(rows, np.int64):
            ids = self.texts.input_ids(int(row))
            if self.augment is not None:
                ids = self.augment(ids, np.random.default_rng([self.seed, epoch, int(row)]))
            captions.append(np.asarray(ids, np.int64))
        width = max((len(c) for c in captions), default=0)
        input_ids = torch.full((len(captions), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(captions), width), dtype=torch.bool)
        for i, ids in enumerate(captions):
            input_ids[i, :len(ids)] = torch.from_numpy(ids)
            mask[i, :len(ids)] = True
        return IdsBatch(input_ids, mask)


# ------------------------------------------------------------------------------------- photos


def images_root(images: ImageCache, override: str | Path | None) -> Path:
    """Where the photos of an image cache are: ``override`` (``data.images_root``, ``cli eval
    --photos``) or the folder recorded at extraction (`recorded_photo_folders`)."""
    if override is not None:
        if not Path(override).is_dir():
            raise InputError(f"{override}: the photo folder given does not exist; an e2e image "
                             "side reads the photos: set data.images_root (cli eval: --photos DIR)")
        return Path(override)
    candidates = recorded_photo_folders(images.attrs, images.path)
    if not candidates:
        raise InputError(f"{images.path}: the cache does not record where its photos are (written "
                         "from precomputed features?); an e2e image side needs them: set "
                         "data.images_root (cli eval: --photos DIR)")
    for root in candidates:
        if root.is_dir():
            return root
    tried = " nor ".join(str(root) for root in candidates)
    raise InputError(f"{tried}: the photo folder recorded in {images.path} does not exist; an e2e "
                     "image side reads the photos: set data.images_root (cli eval: --photos DIR)")


class PhotoFiles:
    """The photos of an image cache's rows, decoded and transformed (``transform``)."""

    def __init__(self, images: ImageCache, root: Path,
                 transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.root, self.transform, self.where = root, transform, images.path
        self.paths = list(images.paths)

    def check(self) -> None:
        """InputError naming the first missing photo (and how many are missing)."""
        missing = [p for p in self.paths if not photo_exists(self.root / p)]
        if missing:
            raise InputError(f"{self.root / missing[0]}: photo of {self.where} not found "
                             f"({len(missing)} of {len(self.paths)} missing); set "
                             "data.images_root (cli eval: --photos DIR) to their folder")

    def photo(self, row: int) -> torch.Tensor:
        return self.transform(load_rgb(self.root / self.paths[row]))

    def read(self, rows: Sequence[int] | np.ndarray, epoch: int = 0) -> PixelBatch:
        """The photos of ``rows``, stacked."""
        return PixelBatch(torch.stack([self.photo(int(row)) for row in rows]))


class _Rows(torch.utils.data.Dataset):
    def __init__(self, files: PhotoFiles, rows: np.ndarray) -> None:
        self.files, self.rows = files, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.files.photo(int(self.rows[i]))


def photo_batches(files: PhotoFiles, rows: np.ndarray, batch_size: int,
                  workers: int = 0) -> Iterator[tuple[np.ndarray, PixelBatch]]:
    """``(rows, PixelBatch)`` of consecutive ``rows``, decoded by ``workers`` processes."""
    loader = torch.utils.data.DataLoader(_Rows(files, rows), batch_size=batch_size,
                                         num_workers=workers)
    for start, pixels in zip(range(0, len(rows), batch_size), loader):
        yield rows[start:start + batch_size], PixelBatch(pixels)


def id_batches(reader: CaptionIds, rows: np.ndarray,
                    batch_size: int) -> Iterator[tuple[np.ndarray, IdsBatch]]:
    """``(rows, IdsBatch)`` of consecutive ``rows``."""
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        yield chunk, reader.read(chunk)
