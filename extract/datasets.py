"""Caption layouts (Flickr30K / COCO / Flickr8k, as in the seed repositories) and image decoding.

A split lives in ``data_path`` as three files:

- ``{split}_caps.txt``: one caption per line, the captions of one image on consecutive lines
  (5 per image in the standard splits);
- ``{split}_ids.txt``: the image id of every caption (one line per caption), or one line per image
  as in the public Flickr30K/COCO ``train_ids.txt`` (then image = caption index // 5);
- ``id_mapping.json``: ``{"<id>": "<image path relative to the images root>"}``. Flickr30K/Flickr8k
  map to file names in the photo folder; COCO maps to paths under a root holding ``train2014/`` and
  ``val2014/``. Without this file (caption-only data such as the Karpathy COCO files) the split still
  loads for text extraction, with ``image_paths = None``.

Your own captioned photos (CSV, TSV, JSONL, imagefolder, WebDataset shards; any number of captions
per photo) load into the same `SplitIndex` through `extract.captioned` and `extract.wds`;
`extract.formats` is the registry of every ``--dataset`` value.

`load_split` reads and validates a split into a `SplitIndex`; `ImageDataset` decodes its images with
PIL in DataLoader workers. Every problem a user can fix raises `InputError` with one line naming the
file and line or row. Decoding is strict: truncated files fail (``LOAD_TRUNCATED_IMAGES`` is never
set), every mode (grayscale, 16-bit, CMYK, palette, alpha) becomes RGB (transparency composited on
white), and the EXIF orientation tag of phone photos is applied (`PIL.ImageOps.exif_transpose`), so
a portrait photo is decoded upright. Only regular files are opened (`open_regular`: a FIFO never
blocks), images over Pillow's decompression-bomb limit are refused, and HEIC/HEIF photos decode when
``pillow-heif`` is installed.
"""

from __future__ import annotations

import io
import json
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np
import torch
from PIL import Image, ImageOps

from cache.errors import InputError
from extract.tar_members import read_member, split_member

CAPTIONS_PER_IMAGE = 5
MAPPING_FILE = "id_mapping.json"

_DATASETS = {
    "f30k": "Flickr30K: id_mapping.json maps ids to file names in the flickr30k-images folder",
    "coco": "COCO: id_mapping.json maps ids to paths under a folder holding train2014/ and val2014/",
    "f8k": "Flickr8k: id_mapping.json maps ids to file names in the Flickr8k photo folder",
}


def list_datasets() -> dict[str, str]:
    """Dataset names accepted by `load_split` and what their image paths are relative to."""
    return dict(_DATASETS)


@dataclass(frozen=True, eq=False)
class SplitIndex:
    """The images and captions of one split.

    ``image_ids`` are unique, in first-appearance order; ``image_paths[row]`` is relative to
    ``images_root`` (None without id_mapping.json); ``caption_image_index[c]`` is the image row of
    caption ``c``.
    """

    dataset: str
    split: str
    image_ids: list[str]
    image_paths: list[str] | None
    captions: list[str]
    caption_image_index: np.ndarray
    images_root: Path | None

    @property
    def num_images(self) -> int:
        return len(self.image_ids)

    @property
    def num_captions(self) -> int:
        return len(self.captions)

    def image_file(self, row: int) -> Path:
        """Absolute path of the image in ``row``."""
        if self.image_paths is None or self.images_root is None:
            raise InputError(f"{self.dataset}/{self.split}: image paths unknown (needs {MAPPING_FILE} and --images)")
        return self.images_root / self.image_paths[row]

    def check_images(self) -> None:
        """Fail with the first missing image file (one directory listing per folder, no decoding)."""
        files = [self.image_file(row) for row in range(self.num_images)]
        listings: dict[Path, set[str]] = {}
        missing = []
        for row, path in enumerate(files):
            if path.parent not in listings:
                listings[path.parent] = _file_names(path.parent)
            if path.name not in listings[path.parent] and not path.is_file():  # is_file: case-insensitive FS
                missing.append(row)
        if missing:
            row = missing[0]
            more = f" ({len(missing) - 1} more missing)" if len(missing) > 1 else ""
            raise InputError(f"{files[row]}: image file not found (row {row}, id {self.image_ids[row]}){more}")


def load_split(
    dataset: str, data_path: str | Path, split: str, images_root: str | Path | None = None
) -> SplitIndex:
    """Read and validate a split; with ``images_root``, also check that every image file exists."""
    if dataset not in _DATASETS:
        raise InputError(f"unknown dataset {dataset!r}; available: {', '.join(_DATASETS)}")
    data_path = Path(data_path)
    if not data_path.is_dir():
        raise InputError(f"{data_path}: data folder not found")
    caps_path = data_path / f"{split}_caps.txt"
    ids_path = data_path / f"{split}_ids.txt"
    for path in (caps_path, ids_path):
        if not path.is_file():
            found = sorted(p.name[: -len("_caps.txt")] for p in data_path.glob("*_caps.txt"))
            raise InputError(f"{path}: file not found (splits in {data_path}: {', '.join(found) or 'none'})")

    captions = _read_lines(caps_path)
    ids = _read_lines(ids_path)
    for number, text in enumerate(captions, start=1):
        if not text.strip():
            raise InputError(f"{caps_path}:{number}: empty caption")
    for number, text in enumerate(ids, start=1):
        if not text.strip():
            raise InputError(f"{ids_path}:{number}: empty image id")
    ids = [text.strip() for text in ids]
    id_line = _id_line_of_caption(caps_path, ids_path, len(captions), len(ids))

    image_rows: dict[str, int] = {}
    first_line: dict[str, int] = {}
    caption_image_index = np.empty(len(captions), dtype=np.int64)
    for caption, line in enumerate(id_line):
        image_id = ids[line]
        if image_id not in image_rows:
            image_rows[image_id] = len(image_rows)
            first_line[image_id] = line
        caption_image_index[caption] = image_rows[image_id]
    image_ids = list(image_rows)

    mapping_path = data_path / MAPPING_FILE
    if mapping_path.is_file():
        image_paths = _map_ids(mapping_path, ids_path, image_ids, first_line)
    elif images_root is not None:
        raise InputError(f"{mapping_path}: file not found (needed to find the images of {ids_path})")
    else:
        image_paths = None

    if images_root is not None:
        images_root = Path(images_root)
        if not images_root.is_dir():
            raise InputError(f"{images_root}: images folder not found ({_DATASETS[dataset]})")
    index = SplitIndex(
        dataset=dataset,
        split=split,
        image_ids=image_ids,
        image_paths=image_paths,
        captions=[text.strip() for text in captions],
        caption_image_index=caption_image_index,
        images_root=images_root,
    )
    if images_root is not None:
        index.check_images()
    return index


class ImageDecodeError(InputError):
    """An image cannot be decoded; the message names the file (and row).

    A DataLoader re-raises a worker's exception as ``type(exc)(worker traceback text)``; this class
    keeps only the original one-line message from that text, so the CLI still prints one line.
    """

    def __init__(self, message: str) -> None:
        super().__init__(_original_message(message))


class ImageDataset(torch.utils.data.Dataset):
    """The images of a split, decoded to RGB with PIL and transformed: item ``row -> (row, tensor)``."""

    def __init__(self, index: SplitIndex, transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.files = [str(index.image_file(row)) for row in range(index.num_images)]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, row: int) -> tuple[int, torch.Tensor]:
        try:
            image = load_rgb(self.files[row])
        except ImageDecodeError as err:
            raise ImageDecodeError(f"{err} (row {row})") from None
        return row, self.transformed(image, row)

    def transformed(self, image: Image.Image, row: int) -> torch.Tensor:
        """The decoded photo of split row ``row``, transformed (`extract.views`: its views)."""
        return self.transform(image)


def _register_heif() -> bool:
    """Let Pillow open HEIC/HEIF photos when ``pillow-heif`` is installed; whether it is."""
    try:
        from pillow_heif import register_heif_opener
    except ImportError:
        return False
    register_heif_opener()
    return True


HEIF_SUPPORTED = _register_heif()


class NotRegularFileError(OSError):
    """A path that is a FIFO, socket, device or folder where a file was expected."""


def open_regular(path: str | Path) -> BinaryIO:
    """``path`` opened for reading if it is a regular file; `NotRegularFileError` at once for a
    FIFO, socket or device (checked before and after opening, which is non-blocking: never hangs)."""
    mode = os.stat(path).st_mode
    if stat.S_ISREG(mode):
        file = open(path, "rb", opener=lambda name, flags: os.open(name, flags | os.O_NONBLOCK))
        mode = os.fstat(file.fileno()).st_mode
        if stat.S_ISREG(mode):
            return file
        file.close()
    raise NotRegularFileError(f"not a regular file ({file_kind(mode)})")


def file_kind(mode: int) -> str:
    """What an ``st_mode`` is, in words (``regular file``, ``FIFO``, ``socket``, ...)."""
    kinds = ((stat.S_ISREG, "regular file"), (stat.S_ISDIR, "folder"), (stat.S_ISFIFO, "FIFO"),
             (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
             (stat.S_ISBLK, "block device"), (stat.S_ISLNK, "symbolic link"))
    return next((name for test, name in kinds if test(mode)), "special file")


def _open_photo(path: str | Path) -> BinaryIO:
    """A loose photo file (`open_regular`) or, when ``path`` runs through a tar shard, that
    member's bytes."""
    if split_member(path) is not None:
        return io.BytesIO(read_member(path))
    return open_regular(path)


def load_rgb(path: str | Path) -> Image.Image:
    """Decode an image fully, turn it upright by its EXIF orientation and convert it to RGB;
    `ImageDecodeError` names the file on failure. Only a regular file is opened (`open_regular`:
    never blocks); an image over Pillow's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS`` x 2)
    is refused, a large one below it (a 100-megapixel photo) is decoded without a warning.
    ``path`` may also name a member of a tar shard (``shard.tar/key.jpg``, `extract.tar_members`)."""
    try:
        with _open_photo(path) as file, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(file) as image:
                image.load()
                return _to_rgb(ImageOps.exif_transpose(image))
    except FileNotFoundError:
        raise ImageDecodeError(f"{path}: image file not found") from None
    except PermissionError:
        raise ImageDecodeError(f"{path}: cannot read image: permission denied") from None
    except NotRegularFileError as err:
        raise ImageDecodeError(f"{path}: {err}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageDecodeError(f"{path}: cannot decode image: {err}") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if image.mode.startswith("I;16") or image.mode == "I":  # 16-bit grayscale: scale, do not clip
        pixels = np.asarray(image, dtype=np.float32) * (255.0 / 65535.0)
        image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
    return image.convert("RGB")


def _read_lines(path: Path) -> list[str]:
    """Lines of a UTF-8 text file (newline-separated only, a final newline optional)."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise InputError(f"{path}:{line}: not valid UTF-8") from None
    if not text:
        raise InputError(f"{path}: file is empty")
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line.rstrip("\r") for line in lines]


def _id_line_of_caption(caps_path: Path, ids_path: Path, num_captions: int, num_ids: int) -> list[int]:
    """Index of the ids-file line that gives each caption's image (per-caption or per-image ids)."""
    if num_ids == num_captions:
        return list(range(num_captions))
    if num_ids * CAPTIONS_PER_IMAGE == num_captions:
        return [caption // CAPTIONS_PER_IMAGE for caption in range(num_captions)]
    raise InputError(
        f"{ids_path}: {num_ids} ids for the {num_captions} captions of {caps_path}: expected one id per caption "
        f"({num_captions}) or one per image ({num_captions / CAPTIONS_PER_IMAGE:g})"
    )


def _map_ids(mapping_path: Path, ids_path: Path, image_ids: list[str], id_line: dict[str, int]) -> list[str]:
    try:
        mapping = json.loads(mapping_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise InputError(f"{mapping_path}: cannot read JSON: {err}") from None
    if not isinstance(mapping, dict):
        raise InputError(f"{mapping_path}: expected a JSON object {{\"<id>\": \"<relative path>\"}}")
    missing = [image_id for image_id in image_ids if image_id not in mapping]
    if missing:
        more = f" ({len(missing) - 1} more ids missing)" if len(missing) > 1 else ""
        line = id_line[missing[0]] + 1
        raise InputError(f"{ids_path}:{line}: id {missing[0]!r} is not in {mapping_path}{more}")
    return [str(mapping[image_id]) for image_id in image_ids]


def _file_names(folder: Path) -> set[str]:
    try:
        with os.scandir(folder) as entries:
            return {entry.name for entry in entries if entry.is_file()}
    except (FileNotFoundError, NotADirectoryError):
        return set()


def _original_message(message: str) -> str:
    lines = message.rstrip().splitlines()
    if len(lines) < 2:
        return message
    prefix = f"{ImageDecodeError.__module__}.{ImageDecodeError.__qualname__}: "
    return lines[-1][len(prefix):] if lines[-1].startswith(prefix) else message
