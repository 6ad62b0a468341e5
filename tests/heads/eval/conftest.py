"""Fixtures of the evaluation tests."""
from __future__ import annotations

from pathlib import Path

import pytest

from cache.store import ImageCache, TextCache
from tests.heads.eval.eval_world import write_split


@pytest.fixture()
def split(tmp_path: Path) -> tuple[ImageCache, TextCache]:
    """A 12-image, 36-caption test split."""
    return write_split(tmp_path)
