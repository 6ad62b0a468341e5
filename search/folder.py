"""A folder of photos as an image list: walk it, fingerprint each file, collect the bad ones.

`scan_folder` walks a folder recursively and keeps the files with an image extension (``.jpg``,
``.jpeg``, ``.png``, ``.webp``, ``.bmp``, ``.gif``, any case); hidden files and folders (a name
starting with ``.``) are skipped, symlinked folders are followed once (a loop is not walked twice).
Zero-byte files and files whose header Pillow does not recognise are reported as bad with a reason
instead of stopping the walk; corrupt or truncated photos are found when they are decoded
(`FolderImages`). A GIF gives its first frame.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from cache.errors import InputError
from extract.datasets import ImageDecodeError, load_rgb
from extract.transforms import ImageTransform

EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")


@dataclass(frozen=True)
class Photo:
    """One file of the folder: its path relative to the root (``/``-separated), size and mtime."""

    path: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class BadFile:
    """A file that is not a usable photo, and why."""

    path: str
    reason: str


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    """The SHA-256 of a file's content, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def scan_folder(root: str | Path) -> list[Photo]:
    """Every file with an image extension under ``root``, sorted by relative path."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: photo folder not found")
    photos: list[Photo] = []
    seen: set[tuple[int, int]] = set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        info = os.stat(folder)
        if (info.st_dev, info.st_ino) in seen:  # a symlink loop back to a folder already walked
            dirs[:] = []
            continue
        seen.add((info.st_dev, info.st_ino))
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if name.startswith(".") or not name.lower().endswith(EXTENSIONS):
                continue
            path = Path(folder) / name
            try:
                stat = path.stat()
            except OSError:  # a dangling symlink
                continue
            photos.append(Photo(path.relative_to(root).as_posix(), stat.st_size, stat.st_mtime_ns))
    return sorted(photos, key=lambda p: p.path)


def header_problem(path: Path) -> str | None:
    """Why ``path`` is surely not a photo (empty, or no image header Pillow knows), else None.
    Reads only the header; a corrupt or truncated body is found when it is decoded."""
    try:
        if path.stat().st_size == 0:
            return "empty file (0 bytes)"
        with Image.open(path):
            return None
    except UnidentifiedImageError:
        return "not an image (unknown file format)"
    except (OSError, SyntaxError, ValueError) as err:
        return f"cannot read: {err}"


class FolderImages(torch.utils.data.Dataset):
    """Photos of a folder decoded (EXIF orientation applied) and transformed for a backbone; item
    ``i -> (i, pixels, reason)`` where a photo that cannot be decoded gives zeros and its reason
    (an empty reason: decoded), so one bad file never stops a DataLoader."""

    def __init__(self, root: Path, paths: list[str], transform: ImageTransform) -> None:
        self.files = [str(root / path) for path in paths]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, row: int) -> tuple[int, torch.Tensor, str]:
        try:
            return row, self.transform(load_rgb(self.files[row])), ""
        except ImageDecodeError as err:
            height, width = self.transform.size
            return row, torch.zeros(3, height, width), _reason(err)


def decode_problem(path: Path) -> str | None:
    """Why a photo does not decode fully (corrupt, truncated), or None when it does."""
    try:
        load_rgb(path)
    except ImageDecodeError as err:
        return _reason(err)
    return None


def _reason(err: ImageDecodeError) -> str:
    """The message of a decoding error without the file name it starts with."""
    return str(err).split(": ", 1)[-1]
