"""Values over an image's token grid drawn on the image: the image as the backbone saw it, grid
values upsampled to it and alpha-blended, cell outlines for selected tokens. (Images are decoded by
`extract.datasets.load_rgb`, the decoder of extraction and indexing.)"""
from __future__ import annotations

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from PIL import Image

HEAT_ALPHA = 0.55


def as_seen(image: Image.Image, preprocessing: dict) -> Image.Image:
    """``image`` resized as the backbone's transform resizes it (``preprocessing``: what a cache
    records, ``backbones.transforms.ImageTransform.to_dict``): no crop, no normalisation."""
    height, width = preprocessing["resize"]
    resample = Image.Resampling[str(preprocessing.get("interpolation", "bicubic")).upper()]
    return image if image.size == (width, height) else image.resize((width, height), resample)


def on_grid(values: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Values of the spatial tokens ``[H*W]`` (raster order) as an ``[H, W]`` array."""
    values = np.asarray(values, dtype=np.float64)
    if values.size != grid[0] * grid[1]:
        raise ValueError(f"{values.size} values for a {grid[0]} x {grid[1]} grid")
    return values.reshape(grid)


def normalise(values: np.ndarray) -> np.ndarray:
    """Finite values scaled to [0, 1] (a constant map becomes 0.5; non-finite ones 0)."""
    finite = np.isfinite(values)
    out = np.zeros_like(values, dtype=np.float64)
    if finite.any():
        low, high = values[finite].min(), values[finite].max()
        out[finite] = 0.5 if high <= low else (values[finite] - low) / (high - low)
    return out


def heat(image: Image.Image, grid_values: np.ndarray, cmap: str = "inferno",
         alpha: float = HEAT_ALPHA) -> Image.Image:
    """``image`` with ``grid_values [H, W]`` (normalised to [0, 1]) as a colour map, bilinearly
    upsampled from the grid to the image and alpha-blended over it."""
    colours = colormaps[cmap](normalise(grid_values))[..., :3]
    small = Image.fromarray((colours * 255).astype(np.uint8))
    return Image.blend(image, small.resize(image.size, Image.Resampling.BILINEAR), alpha)


def dim_outside(image: Image.Image, keep: np.ndarray, factor: float = 0.3) -> Image.Image:
    """``image`` with the cells where ``keep [H, W]`` is False darkened (nearest upsampling)."""
    shade = np.where(keep, 1.0, factor).astype(np.float32)
    big = Image.fromarray((shade * 255).astype(np.uint8)).resize(image.size,
                                                               Image.Resampling.NEAREST)
    pixels = np.asarray(image, np.float32) * (np.asarray(big, np.float32)[..., None] / 255)
    return Image.fromarray(pixels.astype(np.uint8))


def show(ax: Axes, image: Image.Image, title: str) -> None:
    """``image`` in ``ax`` without ticks, with a title."""
    ax.imshow(image)
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def grid_lines(ax: Axes, image: Image.Image, grid: tuple[int, int]) -> None:
    """Thin lines between the grid cells over an image drawn in ``ax``."""
    width, height = image.size
    for row in range(1, grid[0]):
        ax.axhline(row * height / grid[0] - 0.5, color="white", linewidth=0.3, alpha=0.5)
    for col in range(1, grid[1]):
        ax.axvline(col * width / grid[1] - 0.5, color="white", linewidth=0.3, alpha=0.5)
