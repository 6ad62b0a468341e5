"""A folder of photos as an image list: walk it, fingerprint each file, report what is not used.

`scan_folder` walks a folder recursively and keeps the regular files with an image extension
(``.jpg``, ``.jpeg``, ``.png``, ``.webp``, ``.bmp``, ``.gif``, ``.tif``, ``.tiff``, and ``.heic`` /
``.heif`` when ``pillow-heif`` is installed; any case). Hidden files and folders (a name starting with
``.``) and files of other extensions are passed over in silence. Everything else it does not use is
reported (`Scan.skipped`) with its reason instead of stopping the walk: a FIFO, socket or device
with a photo's name, a dangling or looping symbolic link, a link that leaves the folder (followed
only with ``follow_links``), a link to a folder already walked, a HEIC photo without
``pillow-heif``, a folder that cannot be listed. Zero-byte files, unreadable files and files whose
header Pillow does not recognise (or that exceed its decompression-bomb limit) are found by
`header_problem`; corrupt or truncated photos when they are decoded (`FolderImages`). A GIF gives
its first frame. Files are opened only when regular (`extract.datasets.open_regular`), so nothing
blocks.

`printable` is how every path of a user's folder is printed: non-UTF-8 bytes and control characters
escaped.
"""
from __future__ import annotations

import errno
import hashlib
import os
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from backbones.transforms import ImageTransform
from cache.errors import InputError
from extract.datasets import (
    HEIF_SUPPORTED,
    ImageDecodeError,
    NotRegularFileError,
    file_kind,
    load_rgb,
    open_regular,
)

HEIF_EXTENSIONS = (".heic", ".heif")
EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff") + (
    HEIF_EXTENSIONS if HEIF_SUPPORTED else ())
_ESCAPED = ("Cc", "Cs", "Zl", "Zp")   # control characters, lone surrogates, line separators


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


@dataclass
class Scan:
    """The photos of a folder (sorted by path) and the entries skipped, each with its reason."""

    photos: list[Photo] = field(default_factory=list)
    skipped: list[BadFile] = field(default_factory=list)


def printable(text: str | os.PathLike) -> str:
    """``text`` safe to print on a terminal or one table line: a byte that is not UTF-8 (a
    surrogate, as ``os`` decodes file names) as ``\\xNN``, a control character as ``\\n``,
    ``\\x1b``, ``\\u2028``, ..."""
    import unicodedata

    out = []
    for char in str(text):
        if 0xDC80 <= ord(char) <= 0xDCFF:
            out.append(f"\\x{ord(char) - 0xDC00:02x}")
        elif unicodedata.category(char) in _ESCAPED:
            out.append(char.encode("unicode_escape").decode("ascii"))
        else:
            out.append(char)
    return "".join(out)


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    """The SHA-256 of a regular file's content, hex (`OSError` for anything else)."""
    digest = hashlib.sha256()
    with open_regular(path) as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _is_photo_name(name: str) -> bool:
    return name.lower().endswith(EXTENSIONS)


def _unsupported(name: str) -> str | None:
    """Why a file of this name is a photo we cannot read (HEIC without pillow-heif), else None."""
    if not HEIF_SUPPORTED and name.lower().endswith(HEIF_EXTENSIONS):
        return "HEIC/HEIF photo: not supported without pillow-heif (pip install pillow-heif)"
    return None


def scan_folder(root: str | Path, follow_links: bool = False) -> Scan:
    """The photos under ``root`` and the entries skipped (see the module docstring); a symbolic
    link is followed when it stays inside ``root``, or anywhere with ``follow_links``."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{printable(root)}: photo folder not found")
    inside = root.resolve()
    scan = Scan()
    top = os.stat(root)
    seen = {(top.st_dev, top.st_ino)}
    folders = [(root, "")]
    while folders:
        folder, rel = folders.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
        except OSError as err:
            scan.skipped.append(BadFile(rel.rstrip("/") or ".",
                                        f"cannot list folder: {err.strerror}"))
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = rel + entry.name
            problem, info = _entry_problem(entry, inside, follow_links)
            if info is not None and stat.S_ISDIR(info.st_mode):
                if problem is None and (info.st_dev, info.st_ino) in seen:
                    problem = "symbolic link to a folder already walked (a loop or a duplicate)"
                if problem is None:
                    seen.add((info.st_dev, info.st_ino))
                    folders.append((Path(entry.path), path + "/"))
                elif entry.is_symlink():
                    scan.skipped.append(BadFile(path, problem))
                continue
            if info is not None and not _is_photo_name(entry.name) and not _unsupported(entry.name):
                continue                      # another kind of file (a broken link is reported)
            problem = problem or _unsupported(entry.name)
            if problem is None and not stat.S_ISREG(info.st_mode):
                problem = f"not a regular file ({file_kind(info.st_mode)})"
            if problem is not None:
                scan.skipped.append(BadFile(path, problem))
            else:
                scan.photos.append(Photo(path, info.st_size, info.st_mtime_ns))
    scan.photos.sort(key=lambda photo: photo.path)
    scan.skipped.sort(key=lambda bad: bad.path)
    return scan


def _entry_problem(entry: os.DirEntry, inside: Path,
                   follow_links: bool) -> tuple[str | None, os.stat_result | None]:
    """Why a folder entry is not followed (a link that dangles, loops or leaves the folder), and
    the status of what it names (None when that cannot be read)."""
    try:
        info = entry.stat(follow_symlinks=True)
    except OSError as err:
        if entry.is_symlink():
            return (("symbolic link loop" if err.errno == errno.ELOOP else
                     f"dangling symbolic link (to {printable(os.readlink(entry.path))})"), None)
        return f"cannot read: {err.strerror}", None
    if entry.is_symlink() and not follow_links:
        target = Path(os.path.realpath(entry.path))
        if not target.is_relative_to(inside):
            return (f"symbolic link to outside the folder ({printable(target)}); pass "
                    "--follow-links to index it"), info
    return None, info


def header_problem(path: Path) -> str | None:
    """Why ``path`` is surely not a photo (empty, unreadable, no image header Pillow knows, over
    the decompression-bomb limit), else None. Reads only the header; a corrupt or truncated body
    is found when it is decoded."""
    try:
        with open_regular(path) as file, warnings.catch_warnings():
            if os.fstat(file.fileno()).st_size == 0:
                return "empty file (0 bytes)"
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(file):
                return None
    except UnidentifiedImageError:
        return "not an image (unknown file format)"
    except Image.DecompressionBombError as err:
        return f"image too large (a decompression bomb?): {err}"
    except NotRegularFileError as err:
        return str(err)
    except OSError as err:
        return f"cannot read: {err.strerror or err}"
    except (SyntaxError, ValueError) as err:
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
            return row, torch.zeros(3, height, width), _reason(err, self.files[row])


def decode_problem(path: Path) -> str | None:
    """Why a photo does not decode fully (corrupt, truncated), or None when it does."""
    try:
        load_rgb(path)
    except ImageDecodeError as err:
        return _reason(err, path)
    return None


def _reason(err: ImageDecodeError, path: str | Path) -> str:
    """The message of a decoding error without the file name it starts with."""
    return str(err).removeprefix(f"{path}: ")
