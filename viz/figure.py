"""Figures of fixed pixel size on the Agg backend, and their atomic PNG save.

Every figure is a grid of square panels of ``PANEL_INCHES`` at ``DPI`` with a title band on top,
so its size in pixels follows from its panel count alone (``pixel_size``).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from cache.errors import InputError

DPI = 100
PANEL_INCHES = 2.6
TITLE_INCHES = 0.5
MAX_COLUMNS = 4


def panel_shape(panels: int) -> tuple[int, int]:
    """``(rows, columns)`` of a grid holding ``panels`` panels, at most ``MAX_COLUMNS`` wide."""
    cols = max(1, min(panels, MAX_COLUMNS))
    return math.ceil(max(1, panels) / cols), cols


def pixel_size(rows: int, cols: int) -> tuple[int, int]:
    """``(width, height)`` in pixels of a figure of ``rows`` x ``cols`` panels."""
    return round(cols * PANEL_INCHES * DPI), round((rows * PANEL_INCHES + TITLE_INCHES) * DPI)


def panel_figure(panels: int, title: str) -> tuple[Figure, list[Axes]]:
    """A figure with ``panels`` axes in a grid (unused cells hidden) and ``title`` on top; the
    constrained layout keeps labels inside the fixed size."""
    rows, cols = panel_shape(panels)
    width, height = pixel_size(rows, cols)
    fig = plt.figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
    axes = list(fig.subplots(rows, cols, squeeze=False).ravel())
    for ax in axes[panels:]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=9)
    return fig, axes[:panels]


def save_png(fig: Figure, out: str | Path) -> Path:
    """Write ``fig`` to ``out`` as a PNG atomically (a temporary file beside it, then a rename) at
    the figure's own size, and close it."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        if not out.parent.is_dir():
            raise InputError(f"{out}: folder {out.parent} does not exist")
        fig.savefig(tmp, format="png", dpi=DPI)
        os.replace(tmp, out)
    finally:
        plt.close(fig)
        if tmp.exists():
            tmp.unlink()
    return out
