"""Photos inside WebDataset tar shards, addressed as paths: ``<folder>/000001.tar/0001.jpg`` is the
member ``0001.jpg`` of the shard ``<folder>/000001.tar``.

Caches of a WebDataset record their photos this way, so extraction, e2e training and
``cli eval --photos`` read them with the same `extract.datasets.load_rgb` as loose files. A shard's
member table (name -> data offset and size) is read once per process, or handed over by the scan
that checked the shard (`remember`, inherited by forked DataLoader workers); it is keyed by the
file's size and modification time, so a rewritten shard is read again. A photo is one seek and one
read.
"""
from __future__ import annotations

import os
import tarfile
from collections import OrderedDict
from pathlib import Path

SHARD_SUFFIX = ".tar"


def split_member(path: str | Path) -> tuple[Path, str] | None:
    """``(shard, member name)`` if ``path`` runs through an existing ``.tar`` file, else None."""
    parts = Path(path).parts
    for cut in range(len(parts) - 1, 0, -1):
        if parts[cut - 1].endswith(SHARD_SUFFIX):
            shard = Path(*parts[:cut])
            if shard.is_file():
                return shard, "/".join(parts[cut:])
    return None


def photo_exists(path: str | Path) -> bool:
    """Whether a photo exists: a file, or a member of a tar shard (``x.tar/key.jpg``)."""
    return os.path.isfile(path) or member_exists(path)


def member_exists(path: str | Path) -> bool:
    """Whether ``path`` names a complete file member of a tar shard."""
    found = split_member(path)
    if found is None:
        return False
    try:
        return found[1] in _members_of(found[0])
    except OSError:
        return False


def read_member(path: str | Path) -> bytes:
    """The bytes of the shard member ``path`` names; FileNotFoundError if there is none, OSError
    if the shard cannot be read or ends inside the member."""
    found = split_member(path)
    if found is None:
        raise FileNotFoundError(path)
    shard, name = found
    members = _members_of(shard)
    if name not in members:
        raise FileNotFoundError(path)
    offset, size = members[name]
    with open(shard, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise OSError(f"{shard}: member {name!r} is truncated ({len(data)} of {size} bytes)")
    return data


def remember(shard: str | Path, table: dict[str, tuple[int, int]]) -> None:
    """Keep the member table of ``shard`` (name -> data offset and size) a full read of it just
    produced, so that this process and the DataLoader workers it forks need not read it again."""
    stat = os.stat(shard)
    _put((str(shard), stat.st_size, stat.st_mtime_ns), table)


def _members_of(shard: Path) -> dict[str, tuple[int, int]]:
    stat = os.stat(shard)
    key = (str(shard), stat.st_size, stat.st_mtime_ns)
    if key in _TABLES:
        _TABLES.move_to_end(key)
        return _TABLES[key]
    try:
        with tarfile.open(shard, "r:") as tar:
            table = {m.name: (m.offset_data, m.size) for m in tar if m.isfile()}
    except tarfile.TarError as err:
        raise OSError(f"{shard}: not a readable tar shard ({err})") from None
    _put(key, table)
    return table


def _put(key: tuple[str, int, int], table: dict[str, tuple[int, int]]) -> None:
    _TABLES[key] = table
    _TABLES.move_to_end(key)
    while len(_TABLES) > MAX_TABLES:
        _TABLES.popitem(last=False)


MAX_TABLES = 1024       # shards whose member tables a process keeps (~100 bytes per member)
_TABLES: OrderedDict[tuple[str, int, int], dict[str, tuple[int, int]]] = OrderedDict()
