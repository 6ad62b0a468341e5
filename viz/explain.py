"""``cli explain``: the image with what a head used for a caption drawn on it, one drawer per head
branch (``DRAWERS``, keyed ``<head>/<score kind>``).

* LAPS / CAA: the selection score over the patch grid, the kept patches, the fusion weights of
  the dropped ones (``LapsHead.explain``); CAA also its context anchor gate;
* SCAN: each word's attention over the grid (``SCANHead.attention``);
* TGDT local, ALADIN teacher: each word's cosine with every patch token of the alignment (MrSw
  takes the best patch per word);
* embedding heads and branches: one panel saying the score comes from one vector per side.

Word panels cover the words the head scores (its text mask), or the one given with ``word``. Each
map is drawn on its own colour range; its title gives the scale (grid share, best cosine).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from torch import Tensor

from cache.errors import InputError
from heads.base import Encoded
from viz.figure import MAX_COLUMNS, panel_figure, save_png
from viz.inputs import Pair, load_pair
from viz.overlay import dim_outside, grid_lines, heat, on_grid, show


@dataclass(frozen=True)
class Explained:
    """A drawn figure, and the words it has a panel for (empty for heads without word panels)."""

    figure: Figure
    words: list[str]


@dataclass(frozen=True)
class Encodings:
    """A pair encoded by its model: both encodings and the pair's score."""

    images: Encoded
    texts: Encoded
    score: float


Drawer = Callable[[Pair, Encodings, str | None], Explained]
DRAWERS: dict[str, Drawer] = {}


def register_drawer(*keys: str) -> Callable[[Drawer], Drawer]:
    """Decorator: ``drawer`` draws the head branches ``keys`` (``<head>/<score kind>``)."""
    def decorate(drawer: Drawer) -> Drawer:
        for key in keys:
            DRAWERS[key] = drawer
        return drawer
    return decorate


def drawer_key(pair: Pair) -> str:
    """``<head>/<score kind>`` of the pair's model in its active branch."""
    return f"{pair.model.name}/{pair.model.score_kind}"


# ------------------------------------------------------------------------------------ helpers


def _title(pair: Pair, score: float, panels: int) -> str:
    """Head, branch, score and the caption (cut to what ``panels`` panels' width holds)."""
    branch = pair.model.mode or pair.model.score_kind
    limit = 34 * min(panels, MAX_COLUMNS)
    caption = pair.caption if len(pair.caption) <= limit else pair.caption[:limit - 3] + "..."
    return f"{pair.model.name} ({branch})  score {score:.3f}\n\"{caption}\""


def _grid(pair: Pair) -> tuple[tuple[int, int], int]:
    """The grid and prefix token count of what the head reads on the image side."""
    spec = pair.model.head.image_spec
    if spec.grid is None:
        raise InputError(f"{pair.checkpoint}: head {pair.model.name!r} reads image tokens "
                         "without a grid; nothing to draw on")
    return spec.grid, spec.prefix_tokens


def _refuse_word(pair: Pair, word: str | None) -> None:
    if word is not None:
        raise InputError(f"--word: head {pair.model.name!r} ({pair.model.score_kind}) draws no "
                         "per-word evidence; drop --word")


def _plain(token: str) -> str:
    return token.removeprefix("##").lower()


def word_rows(words: list[str], mask: Tensor, word: str | None) -> list[int]:
    """Positions of the scored words (``mask [L]``), or of ``word`` among them (InputError listing
    the scored words when it is not one)."""
    rows = [i for i in range(len(words)) if bool(mask[i])]
    if word is None:
        return rows
    chosen = [i for i in rows if _plain(words[i]) == _plain(word)]
    if not chosen:
        raise InputError(f"--word {word!r} is not among the words the head scores: "
                         f"{' '.join(words[i] for i in rows)}")
    return chosen


def _word_figure(pair: Pair, enc: Encodings, maps: Tensor, words: list[str], mask: Tensor,
                 word: str | None, label: Callable[[Tensor], str]) -> Explained:
    """The image, then one panel per scored word with its map over the grid (``maps [L, H*W]``,
    rows aligned with ``words``); ``label(row)`` adds a note to each word's title."""
    grid, _ = _grid(pair)
    rows = word_rows(words, mask, word)
    fig, axes = panel_figure(1 + len(rows), _title(pair, enc.score, 1 + len(rows)))
    show(axes[0], pair.seen, f"image ({pair.seen.size[0]} x {pair.seen.size[1]} px)")
    grid_lines(axes[0], pair.seen, grid)
    for ax, row in zip(axes[1:], rows):
        show(ax, heat(pair.seen, on_grid(maps[row].numpy(), grid)),
             f"{words[row]}  {label(maps[row])}")
    return Explained(fig, [words[row] for row in rows])


def encode(pair: Pair) -> Encodings:
    """The pair through its model (no gradient), in float32."""
    with torch.no_grad():
        images = pair.model.encode_images(pair.image)
        texts = pair.model.encode_texts(pair.text)
        score = float(pair.model.score_pairs(images, texts)[0])
    return Encodings(images, texts, score)


# ------------------------------------------------------------------------------------ drawers


def _slimming_panels(pair: Pair, enc: Encodings, axes: list[Axes]) -> None:
    """LAPS's selection score, kept patches and fusion weights in three axes."""
    grid, _ = _grid(pair)
    with torch.no_grad():
        evidence = {k: v[0, 0].float().numpy() for k, v in
                    pair.model.head.explain(enc.images, enc.texts).items()}
    keep = evidence["keep"].astype(bool)
    show(axes[0], heat(pair.seen, on_grid(evidence["scores"], grid)),
         "selection score (saliency + relevance)")
    show(axes[1], dim_outside(pair.seen, on_grid(keep, grid).astype(bool)),
         f"kept {int(keep.sum())} of {keep.size} patches")
    show(axes[2], heat(pair.seen, on_grid(evidence["fuse"], grid), cmap="viridis"),
         f"fused: {keep.size - int(keep.sum())} dropped patches")
    for ax in axes:
        grid_lines(ax, pair.seen, grid)


@register_drawer("laps/interaction")
def draw_laps(pair: Pair, enc: Encodings, word: str | None) -> Explained:
    """The image, the selection score, the kept patches, the fused ones."""
    _refuse_word(pair, word)
    fig, axes = panel_figure(4, _title(pair, enc.score, 4))
    show(axes[0], pair.seen, f"image ({pair.seen.size[0]} x {pair.seen.size[1]} px)")
    _slimming_panels(pair, enc, axes[1:])
    return Explained(fig, [])


@register_drawer("caa/interaction")
def draw_caa(pair: Pair, enc: Encodings, word: str | None) -> Explained:
    """The CAA gate over the grid, then what LAPS selected with it."""
    _refuse_word(pair, word)
    grid, _ = _grid(pair)
    head = pair.model.head
    with torch.no_grad():
        _, _, patches, mask = head.project_images(pair.model.image_source(pair.image))
        gate = head.gate(patches, mask).mean(dim=-1)[0].float().numpy()
    fig, axes = panel_figure(4, _title(pair, enc.score, 4))
    show(axes[0], heat(pair.seen, on_grid(gate, grid), cmap="viridis"),
         f"CAA gate ({gate.min():.2f} .. {gate.max():.2f})")
    _slimming_panels(pair, enc, axes[1:])
    return Explained(fig, [])


@register_drawer("scan/interaction")
def draw_scan(pair: Pair, enc: Encodings, word: str | None) -> Explained:
    """Each word's attention over the grid (prefix tokens count as regions: their share noted)."""
    grid, prefix = _grid(pair)
    with torch.no_grad():
        attention = pair.model.head.attention(enc.images, enc.texts)[0]        # [L, T]
    cells = grid[0] * grid[1]
    maps = attention[:, prefix:prefix + cells]
    return _word_figure(pair, enc, maps, pair.words, enc.texts["mask"][0], word,
                        lambda row: f"(grid {float(row.sum()):.0%})")


@register_drawer("tgdt/interaction", "aladin/interaction")
def draw_alignment(pair: Pair, enc: Encodings, word: str | None) -> Explained:
    """Each word's cosine with every patch of the alignment set (MrSw keeps its best)."""
    grid, _ = _grid(pair)
    cells = grid[0] * grid[1]
    sims = (enc.texts["tokens"][0] @ enc.images["tokens"][0].transpose(0, 1))[:, :cells]
    words = pair.words[pair.model.head.text_spec.prefix_tokens:]   # the set drops the prefix
    return _word_figure(pair, enc, sims, words, enc.texts["mask"][0], word,
                        lambda row: f"(max {float(row.max()):.2f})")


@register_drawer("linear/embedding", "vse/embedding", "hrem/embedding", "tgdt/embedding",
                 "aladin/embedding")
def draw_embedding(pair: Pair, enc: Encodings, word: str | None) -> Explained:
    """The image and a note: one vector per side, no spatial evidence to draw."""
    _refuse_word(pair, word)
    fig, axes = panel_figure(1, _title(pair, enc.score, 1))
    show(axes[0], pair.seen, "no spatial evidence")
    axes[0].set_xlabel(f"{pair.model.name} scores the cosine\nof one vector per side", fontsize=7)
    return Explained(fig, [])


def explain(checkpoint: str | Path, image: str | Path, caption: str, out: str | Path,
            word: str | None = None, mode: str | None = None) -> Explained:
    """Draw what the head of ``checkpoint`` (branch ``mode``) used in ``image`` for ``caption``
    into ``out`` (PNG); returns the figure (closed) and its word panels."""
    pair = load_pair(checkpoint, image, caption, mode)
    key = drawer_key(pair)
    if key not in DRAWERS:
        raise InputError(f"{checkpoint}: no picture for head branch {key!r}; known: "
                         f"{', '.join(sorted(DRAWERS))}")
    explained = DRAWERS[key](pair, encode(pair), word)
    save_png(explained.figure, out)
    return explained
