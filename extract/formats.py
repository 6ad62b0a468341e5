"""What ``cli extract --dataset`` accepts: the Karpathy caption layouts (``f30k``, ``coco``,
``f8k``, `extract.datasets`) and your own captioned photos (``csv``, ``tsv``, ``jsonl``,
``imagefolder``: `extract.captioned`; ``wds``: `extract.wds`).

Each `DatasetFormat` says which folder under ``--out`` its caches go to (`DatasetFormat.name`: the
dataset name itself for the Karpathy layouts, else ``--name`` or the name of the data file,
folder or shard folder) and loads the requested splits (`DatasetFormat.load`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from cache.errors import InputError
from extract.captioned import TABLE_READERS, LoadedSplits, TableOptions, group_rows, read_imagefolder
from extract.datasets import list_datasets, load_split


@dataclass(frozen=True)
class DatasetRequest:
    """The dataset options of one ``cli extract`` call."""

    data_paths: tuple[str, ...]
    splits: list[str]
    images: str | None = None
    need_photos: bool = True
    name: str | None = None
    table: TableOptions = field(default_factory=TableOptions)

    def data_path(self) -> Path:
        """The one ``--data-path`` of a format that takes one."""
        if len(self.data_paths) != 1:
            raise InputError("--data-path: give exactly one (several only for wds, one per split "
                             f"as SPLIT=PATTERN), got {len(self.data_paths)}")
        return Path(self.data_paths[0])


@dataclass(frozen=True)
class DatasetFormat:
    """One ``--dataset`` value: what it reads and where its caches go."""

    default_name: Callable[[str, DatasetRequest], str]
    loader: Callable[[str, str, DatasetRequest], LoadedSplits]

    def name(self, dataset: str, request: DatasetRequest) -> str:
        """The cache folder under ``--out``: ``--name`` or the format's default."""
        name = request.name or self.default_name(dataset, request)
        if not name or "/" in name or name.startswith("."):
            raise InputError(f"--name {name!r}: must be a plain folder name")
        return name

    def load(self, dataset: str, request: DatasetRequest) -> LoadedSplits:
        """The requested splits, checked (photos too when ``request.need_photos``)."""
        return self.loader(dataset, self.name(dataset, request), request)


def _karpathy(dataset: str, name: str, request: DatasetRequest) -> LoadedSplits:
    given = {"--image-key": request.table.image_key,
             "--caption-key": request.table.caption_key,
             "--split-ratio": request.table.split_ratio,
             "--skip-missing": request.table.skip_missing}
    named = [option for option, value in given.items() if value]
    if named:
        raise InputError(f"{', '.join(named)}: only for your own captioned photos (--dataset csv, "
                         f"tsv, jsonl, imagefolder, wds), not for {dataset}")
    if request.need_photos and request.images is None:
        raise InputError("--images is required with --backbone (the folder of the image files)")
    data_path = request.data_path()
    images = request.images if request.need_photos else None
    return LoadedSplits({split: load_split(dataset, data_path, split, images)
                         for split in request.splits})


def _images_folder(request: DatasetRequest, default: Path) -> Path:
    images = Path(request.images) if request.images else default
    if request.need_photos and not images.is_dir():
        raise InputError(f"{images}: photo folder not found (--images)")
    return images


def _table(fmt: str) -> Callable[[str, str, DatasetRequest], LoadedSplits]:
    def load(dataset: str, name: str, request: DatasetRequest) -> LoadedSplits:
        path = request.data_path()
        if not path.is_file():
            raise InputError(f"{path}: {fmt} file not found (--data-path)")
        rows = TABLE_READERS[fmt](path, request.table)
        return group_rows(rows, name, request.splits, _images_folder(request, path.parent),
                          request.table, str(path), request.need_photos)
    return load


def _imagefolder(dataset: str, name: str, request: DatasetRequest) -> LoadedSplits:
    folder = request.data_path()
    if request.images is not None:
        raise InputError("--images does not apply to an imagefolder: its photos are beside its "
                         "metadata file, under --data-path")
    rows = read_imagefolder(folder, request.table)
    return group_rows(rows, name, request.splits, folder, request.table, str(folder),
                      request.need_photos)


def _wds(dataset: str, name: str, request: DatasetRequest) -> LoadedSplits:
    from extract.wds import load_wds

    if request.images is not None:
        raise InputError("--images does not apply to wds: the photos are inside the shards")
    return load_wds(request.data_paths, name, request.splits, request.table)


def _wds_name(dataset: str, request: DatasetRequest) -> str:
    from extract.wds import expand_braces, split_label

    if not request.data_paths:
        raise InputError("--data-path: name the shards (or give --name)")
    pattern = split_label(request.data_paths[0])[1]
    return Path(expand_braces(pattern)[0]).resolve().parent.name


def _file_stem(dataset: str, request: DatasetRequest) -> str:
    return request.data_path().stem


def _folder_name(dataset: str, request: DatasetRequest) -> str:
    return request.data_path().resolve().name


FORMATS: dict[str, DatasetFormat] = {
    **{name: DatasetFormat(lambda dataset, request: dataset, _karpathy)
       for name in list_datasets()},                  # the Karpathy layouts: f30k, coco, f8k
    "csv": DatasetFormat(_file_stem, _table("csv")),  # one (photo, caption) row each
    "tsv": DatasetFormat(_file_stem, _table("tsv")),
    "jsonl": DatasetFormat(_file_stem, _table("jsonl")),  # a caption may be a list
    "imagefolder": DatasetFormat(_folder_name, _imagefolder),  # Hugging Face metadata files
    "wds": DatasetFormat(_wds_name, _wds),            # WebDataset tar shards
}


def dataset_format(dataset: str) -> DatasetFormat:
    """The format of a ``--dataset`` value; InputError listing the accepted ones."""
    if dataset not in FORMATS:
        raise InputError(f"unknown dataset {dataset!r}; available: {', '.join(FORMATS)}")
    return FORMATS[dataset]
