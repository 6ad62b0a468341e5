"""Hostile files for the tests of code that reads a user's files: a decompression bomb's header,
and a guard that turns a hang into a failure."""
from __future__ import annotations

import io
import signal
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from PIL import Image

HANG_GUARD_S = 600   # only stops a walk that blocks forever on a FIFO, never a slow one


def png_header(path: Path, width: int, height: int) -> None:
    """A PNG that claims ``width`` x ``height`` pixels (a decompression bomb's header) in 70 bytes."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    path.write_bytes(bytes(data))


@contextmanager
def hang_guard() -> Iterator[None]:
    """Fail (instead of blocking forever) when the block has not returned after HANG_GUARD_S."""
    def hung(*_: object) -> None:
        raise TimeoutError(f"blocked for {HANG_GUARD_S} s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(HANG_GUARD_S)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
