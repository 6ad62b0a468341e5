"""Several views per training photo (``cli extract --views V``): the centre view and V - 1 augmented.

View 0 is the photo through the encoder's own preprocessing (``encoder.transform``), exactly what a
one-view cache holds; views 1..V-1 are `backbones.transforms.training_transform` (RandomResizedCrop
at ``crop_scale`` to the encoder's resolution, horizontal flip with probability 0.5,
torchvision.transforms.v2; the crop scale of the e2e sources). The random draws of view v of split
row r come from torch's generator seeded with (seed, r, v) alone, so a rerun, a resumed run and
every shard draw the same views whatever the batch size, workers or order.

`ViewImages` decodes each photo once and returns its V views ``[V, 3, H, W]``; the cache records
the views (``views``) and how they were drawn (``augmentation``, `Views.record`), and stores them as
`cache.store` describes (``tokens`` the centre view, ``view_tokens`` the others). How training reads
them: `cache.datasets.view_of`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from backbones.transforms import CROP_SCALE, ImageTransform, training_transform
from cache.errors import InputError
from extract.datasets import ImageDataset, SplitIndex

TRAIN_SPLIT = "train"   # the one split that gets views; the others get the centre view


@dataclass(frozen=True)
class Views:
    """How many views per photo (``count``; 1 = the centre view only) and how the others are
    drawn."""

    count: int = 1
    crop_scale: tuple[float, float] = CROP_SCALE
    seed: int = 0

    def __post_init__(self) -> None:
        if self.count < 1:
            raise InputError(f"--views must be >= 1, got {self.count}")
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise InputError(f"--crop-scale {low},{high}: must be LOW,HIGH with "
                             "0 < LOW <= HIGH <= 1")

    def record(self) -> dict[str, Any]:
        """The cache's ``augmentation`` attribute (empty for one view)."""
        if self.count == 1:
            return {}
        return {"transform": "RandomResizedCrop + RandomHorizontalFlip (torchvision.transforms.v2)",
                "crop_scale": list(self.crop_scale), "flip": 0.5, "seed": self.seed,
                "seeded_by": "(seed, split row, view)", "view_0": "centre (the preprocessing)"}


def for_split(views: Views, split: str) -> Views:
    """The views a split gets: ``views`` for the training split, the centre view for the others."""
    return views if split == TRAIN_SPLIT else Views()


def view_seed(seed: int, row: int, view: int) -> int:
    """The torch seed of view ``view`` of split row ``row``."""
    return int(np.random.SeedSequence([seed, row, view]).generate_state(1, np.uint64)[0] >> 1)


class ViewTransform:
    """Photo (and its split row) -> its views ``[V, 3, H, W]``: the centre view, then V - 1 draws
    of the training augmentation seeded by (seed, row, view). Picklable (DataLoader workers)."""

    def __init__(self, transform: ImageTransform, views: Views) -> None:
        self.centre, self.views = transform, views
        self.augment: Callable[[Image.Image], torch.Tensor] = training_transform(
            transform, views.crop_scale)

    def __call__(self, image: Image.Image, row: int) -> torch.Tensor:
        out = [self.centre(image)]
        for view in range(1, self.views.count):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(view_seed(self.views.seed, row, view))
                out.append(self.augment(image))
        return torch.stack(out)


class ViewImages(ImageDataset):
    """The photos of a split as views: item ``row -> (row, [V, 3, H, W])``."""

    def __init__(self, index: SplitIndex, transform: ImageTransform, views: Views) -> None:
        super().__init__(index, transform)
        self.view_transform = ViewTransform(transform, views)

    def transformed(self, image: Image.Image, row: int) -> torch.Tensor:
        return self.view_transform(image, row)
