"""``cli demo-data``: a small, learnable image-caption set in the Flickr30K layout.

Every image is a rendered scene of one to three coloured shapes on a textured background; each of its
five captions is worded differently but names what is really drawn: the colour, shape, size and
number of the shapes and where they are (relative to each other, or in the frame for a single shape).
A retrieval head trained on it must therefore reach recall far above chance, which makes it a quick
end-to-end check of the whole toolkit (``make demo``) without downloading a dataset.

Output (the same layout as ``../shared/data/f8k``)::

    DIR/images/scene_00000.jpg ...        the rendered scenes (JPEG)
    DIR/id_mapping.json                   {"<id>": "scene_00000.jpg", ...}
    DIR/{train,dev,test}_caps.txt         one caption per line, 5 consecutive lines per image
    DIR/{train,dev,test}_ids.txt          the image id of every caption line

The output is a pure function of (number of images, image size, seed): every scene draws from its
own ``random.Random(seed, index)`` stream.
"""
from __future__ import annotations

import csv
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

from cache.errors import InputError

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 38, 38), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 215, 30),
    "purple": (140, 50, 180), "orange": (245, 135, 20), "cyan": (40, 200, 215),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (242, 242, 238), "gray": (128, 128, 128), "black": (22, 22, 26), "beige": (225, 205, 165),
}
SIZES = {"small": 0.075, "large": 0.145}   # shape radius as a fraction of the image side
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
SIZE_SYNONYMS = {"small": ("small", "little", "tiny"), "large": ("large", "big", "huge")}


# ------------------------------------------------------------------------------------------ shapes


def _polygon(cx: float, cy: float, r: float, corners: int, rotation: float,
             inner: float = 1.0) -> list[tuple[float, float]]:
    """Vertices of a regular polygon (``inner < 1`` alternates radii: a star)."""
    steps = corners * (2 if inner < 1.0 else 1)
    points = []
    for k in range(steps):
        radius = r if (inner >= 1.0 or k % 2 == 0) else r * inner
        angle = rotation + 2 * math.pi * k / steps
        points.append((cx + radius * math.sin(angle), cy - radius * math.cos(angle)))
    return points


def _circle(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float, fill: tuple) -> None:
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)


def _polygon_shape(corners: int, rotation: float, scale: float = 1.0,
                   inner: float = 1.0) -> Callable[..., None]:
    def draw_it(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float, fill: tuple) -> None:
        draw.polygon(_polygon(cx, cy, r * scale, corners, rotation, inner), fill=fill)
    return draw_it


SHAPES: dict[str, Callable[..., None]] = {
    "circle": _circle,
    "square": _polygon_shape(4, math.pi / 4, scale=1.15),
    "triangle": _polygon_shape(3, 0.0, scale=1.2),
    "star": _polygon_shape(5, 0.0, scale=1.25, inner=0.45),
    "diamond": _polygon_shape(4, 0.0, scale=1.2),
    "hexagon": _polygon_shape(6, math.pi / 6),
}


# ------------------------------------------------------------------------------------------ scenes


@dataclass(frozen=True)
class Item:
    """One drawn shape: its attributes and centre (pixels)."""

    colour: str
    shape: str
    size: str
    x: float
    y: float

    def phrase(self, rng: random.Random, with_size: bool = True) -> str:
        size = rng.choice(SIZE_SYNONYMS[self.size]) + " " if with_size else ""
        return f"{size}{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    background: str
    items: tuple[Item, ...]


def _random_scene(rng: random.Random, side: int) -> Scene:
    """Pick a background and one to three non-overlapping shapes (distinct cells of a 3x3 grid)."""
    count = rng.choice((1, 2, 2, 3, 3))
    cells = rng.sample(range(9), count)
    items = []
    for cell in cells:
        size = rng.choice(tuple(SIZES))
        cell_side = side / 3
        jitter = cell_side * 0.1
        margin = SIZES[size] * side * 1.25  # keep the whole shape (star tips included) in frame
        x = (cell % 3 + 0.5) * cell_side + rng.uniform(-jitter, jitter)
        y = (cell // 3 + 0.5) * cell_side + rng.uniform(-jitter, jitter)
        x, y = min(max(x, margin), side - margin), min(max(y, margin), side - margin)
        items.append(Item(rng.choice(tuple(COLOURS)), rng.choice(tuple(SHAPES)), size, x, y))
    items.sort(key=lambda it: (it.x, it.y))  # left to right: captions describe in this order
    return Scene(rng.choice(tuple(BACKGROUNDS)), tuple(items))


def _render(scene: Scene, side: int, rng: random.Random) -> Image.Image:
    """Draw the scene over a background with a gentle gradient and pixel noise."""
    base = np.array(BACKGROUNDS[scene.background], np.float32)
    ramp = np.linspace(-18, 18, side, dtype=np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    gradient = math.cos(angle) * ramp[None, :] + math.sin(angle) * ramp[:, None]
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0, 6, (side, side, 1))
    pixels = np.clip(base + gradient[..., None] + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(image)
    for item in scene.items:
        SHAPES[item.shape](draw, item.x, item.y, SIZES[item.size] * side, COLOURS[item.colour])
    return image


# ------------------------------------------------------------------------------------------ captions


def _relation(a: Item, b: Item) -> str:
    """Where ``a`` is relative to ``b``: the dominant axis decides."""
    dx, dy = b.x - a.x, b.y - a.y
    if abs(dx) >= abs(dy):
        return "to the left of" if dx > 0 else "to the right of"
    return "above" if dy > 0 else "below"


def _place(item: Item, side: int) -> str:
    """Where a single shape sits in the frame."""
    col = ("left", "center", "right")[min(2, int(item.x / (side / 3)))]
    row = ("top", "middle", "bottom")[min(2, int(item.y / (side / 3)))]
    if col == "center" and row == "middle":
        return "in the center"
    if col == "center":
        return f"at the {row}"
    if row == "middle":
        return f"on the {col}"
    return f"in the {row} {col} corner"


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _captions(scene: Scene, side: int, rng: random.Random) -> list[str]:
    """Five differently worded, truthful captions of a scene."""
    items, bg, n = scene.items, scene.background, len(scene.items)
    ph = [it.phrase(rng) for it in items]
    short = [it.phrase(rng, with_size=False) for it in items]
    if n == 1:
        where = _place(items[0], side)
        return [
            f"{_article(ph[0])} {where} of a {bg} background",
            f"one {ph[0]} on {bg}, placed {where}",
            f"a single {items[0].size} shape: {_article(short[0])} {where}",
            f"there is only {_article(ph[0])} {where} of the picture",
            f"{where}, {_article(ph[0])} on a {bg} backdrop",
        ]
    rel = [_relation(items[i], items[i + 1]) for i in range(n - 1)]
    chain = _article(ph[0]) + "".join(f" {rel[i]} {_article(ph[i + 1])}" for i in range(n - 1))
    listing = ", ".join(_article(p) for p in ph[:-1]) + f" and {_article(ph[-1])}"
    inverse = {"to the left of": "to the right of", "to the right of": "to the left of",
               "above": "below", "below": "above"}
    last = f"{_article(ph[-1])} {inverse[rel[-1]]} {_article(ph[-2])}"
    sizes = sorted({it.size for it in items})
    size_note = (f"all of them {sizes[0]}" if len(sizes) == 1
                 else "different sizes")
    return [
        f"{chain} on a {bg} background",
        f"{COUNT_WORDS[n]} shapes on {bg}: {listing}",
        last + (f", and {_article(ph[0])} {rel[0]} {_article(ph[1])}" if n == 3 else ""),
        f"{COUNT_WORDS[n]} coloured shapes, {size_note}: " + ", ".join(short),
        f"a {bg} picture with {listing}, the {short[0]} is the leftmost",
    ]


# ------------------------------------------------------------------------------------------ writing


def split_sizes(num_images: int) -> dict[str, int]:
    """Train/dev/test image counts: dev and test get 1/12 each (100 of 1,200)."""
    held_out = max(1, round(num_images / 12))
    if num_images < 3 * held_out or num_images - 2 * held_out < 1:
        raise InputError(f"demo-data: {num_images} images are too few for three splits (need >= 3)")
    return {"train": num_images - 2 * held_out, "dev": held_out, "test": held_out}


def render_example(index: int, side: int = 224, seed: int = 0) -> tuple[Image.Image, list[str],
                                                                         Scene]:
    """Image, five captions and scene description of example ``index`` (a pure function)."""
    rng = random.Random(seed * 1_000_003 + index)
    scene = _random_scene(rng, side)
    image = _render(scene, side, rng)
    return image, _captions(scene, side, rng), scene


def generate_demo_data(root: str | Path, num_images: int = 1200, side: int = 224,
                       seed: int = 0) -> dict[str, int]:
    """Render ``num_images`` scenes with captions into ``root``; returns the images per split."""
    root = Path(root)
    sizes = split_sizes(num_images)
    if side < 32:
        raise InputError(f"demo-data: image size {side} px is too small (need >= 32)")
    (root / "images").mkdir(parents=True, exist_ok=True)
    mapping: dict[str, str] = {}
    first = 0
    for split, count in sizes.items():
        caps, ids = [], []
        for index in range(first, first + count):
            image, captions, _ = render_example(index, side, seed)
            name = f"scene_{index:05d}.jpg"
            image.save(root / "images" / name, quality=90)
            mapping[str(index)] = name
            for caption in captions:
                caps.append(caption)
                ids.append(str(index))
        (root / f"{split}_caps.txt").write_text("\n".join(caps) + "\n", encoding="utf-8")
        (root / f"{split}_ids.txt").write_text("\n".join(ids) + "\n", encoding="utf-8")
        first += count
    (root / "id_mapping.json").write_text(json.dumps(mapping, indent=0), encoding="utf-8")
    return sizes


def write_example_csv(root: str | Path, num_images: int = 60, side: int = 64,
                      seed: int = 0) -> Path:
    """A tiny "your own captioned photos" set: rendered scenes in ``root/photos`` and
    ``root/captions.csv`` (columns ``filepath``, ``title`` as open_clip reads them, no split
    column), one row per (photo, caption) with one to five captions per photo."""
    root = Path(root)
    (root / "photos").mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(num_images):
        image, captions, _ = render_example(index, side, seed)
        name = f"scene_{index:05d}.jpg"
        image.save(root / "photos" / name, quality=90)
        rows.extend((name, caption) for caption in captions[:1 + index % len(captions)])
    path = root / "captions.csv"
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filepath", "title"])
        writer.writerows(rows)
    return path
