"""The folder walk: extensions in any case, hidden entries and symlink loops skipped, bad files
recognised by their header."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cache.errors import InputError
from search.folder import decode_problem, header_problem, scan_folder


def _photo(path: Path, fmt: str = "JPEG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 12), (10, 200, 30)).save(path, fmt)


def test_walk_keeps_image_extensions_in_any_case_and_skips_hidden_and_loops(tmp_path: Path) -> None:
    _photo(tmp_path / "a.JPG")
    _photo(tmp_path / "sub" / "b.jpeg")
    _photo(tmp_path / "sub" / "deep" / "c.png", "PNG")
    _photo(tmp_path / "d.WebP", "WEBP")
    _photo(tmp_path / "e.bmp", "BMP")
    _photo(tmp_path / "f.gif", "GIF")
    _photo(tmp_path / ".hidden" / "x.jpg")
    _photo(tmp_path / ".y.jpg")
    (tmp_path / "readme.txt").write_text("no")
    os.symlink(tmp_path / "sub", tmp_path / "sub" / "deep" / "loop")      # a loop back up
    os.symlink(tmp_path / "gone.jpg", tmp_path / "dangling.jpg")
    paths = [photo.path for photo in scan_folder(tmp_path)]
    assert paths == ["a.JPG", "d.WebP", "e.bmp", "f.gif", "sub/b.jpeg", "sub/deep/c.png"]


def test_bad_files_are_recognised_with_a_reason(tmp_path: Path) -> None:
    _photo(tmp_path / "good.jpg")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.png").write_text("this is not an image")
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "noise.jpg", quality=95)
    whole = (tmp_path / "noise.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(whole[:len(whole) // 2])
    assert header_problem(tmp_path / "good.jpg") is None
    assert header_problem(tmp_path / "empty.jpg") == "empty file (0 bytes)"
    assert "not an image" in header_problem(tmp_path / "text.png")
    assert header_problem(tmp_path / "truncated.jpg") is None        # found when decoded
    assert "truncated" in decode_problem(tmp_path / "truncated.jpg")
    assert decode_problem(tmp_path / "good.jpg") is None


def test_a_missing_folder_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="photo folder not found"):
        scan_folder(tmp_path / "nope")
