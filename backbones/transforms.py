"""Image preprocessing of an encoder: PIL image -> normalised float tensor ``[3, H, W]``.

`ImageTransform` is a small frozen dataclass, so it pickles cheaply into DataLoader workers (a bound
method of an encoder would drag the whole model along). It resizes with PIL to a fixed size, aspect
ratio not kept and no crop (the usual retrieval preprocessing), rescales to [0, 1] and normalises
with the encoder's mean and std. `to_dict()` is what a feature cache records as ``preprocessing``.
`training_transform` is the augmentation of training views at an encoder's resolution and
normalisation (e2e training, ``cli extract --views``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF_MEAN = (0.5, 0.5, 0.5)
HALF_STD = (0.5, 0.5, 0.5)
CROP_SCALE = (0.6, 1.0)   # RandomResizedCrop scale of training views (the references' e2e recipe)

_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
}


@dataclass(frozen=True)
class ImageTransform:
    """Resize to ``size`` (height, width) with PIL, scale to [0, 1], normalise per channel."""

    size: tuple[int, int]
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self) -> None:
        if self.interpolation not in _RESAMPLE:
            raise ValueError(f"interpolation must be one of {sorted(_RESAMPLE)}, got {self.interpolation!r}")

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """Return the normalised ``float32`` tensor ``[3, H, W]`` of an image (converted to RGB)."""
        if img.mode != "RGB":
            img = img.convert("RGB")
        height, width = self.size
        if img.size != (width, height):
            img = img.resize((width, height), _RESAMPLE[self.interpolation])
        pixels = np.asarray(img, dtype=np.float32) * (1.0 / 255.0)
        pixels = (pixels - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))

    def to_dict(self) -> dict:
        """JSON-able description, recorded in the cache attributes."""
        return {
            "resize": list(self.size),
            "interpolation": self.interpolation,
            "crop": None,
            "rescale": "1/255",
            "mean": list(self.mean),
            "std": list(self.std),
            "color": "RGB",
            "library": "PIL",
        }


def training_transform(transform: ImageTransform,
                       crop_scale: tuple[float, float] = CROP_SCALE) -> Callable[[Image.Image], torch.Tensor]:
    """The references' training augmentation at the resolution and normalisation of an
    encoder's ``transform``: random resized crop (``crop_scale``), horizontal flip."""
    from torchvision.transforms import InterpolationMode, v2

    return v2.Compose([
        v2.ToImage(),
        v2.RandomResizedCrop(transform.size, scale=tuple(crop_scale),
                             interpolation=InterpolationMode(transform.interpolation),
                             antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(transform.mean), list(transform.std)),
    ])
