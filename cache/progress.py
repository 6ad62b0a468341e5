"""Progress of long work: a tqdm bar on a terminal, plain lines in a log file.

On a terminal the bar redraws in place. When the stream is not a terminal (``nohup``, a log file, CI)
``progress_bar`` writes one complete line (``desc: pct|bar| n/total [elapsed<remaining, rate]``) when
it starts, at most every ``LOG_INTERVAL_S`` seconds while it runs, and a last one with the total and
the overall rate when it is closed; no carriage returns and no blank lines.
"""
from __future__ import annotations

import sys
from typing import Any, TextIO

from tqdm import tqdm

LOG_INTERVAL_S = 30.0


class _Lines:
    """A stream that turns each redraw tqdm writes (``\\r`` + status + padding) into one line; the
    bare ``\\n`` / ``\\r`` tqdm writes when it closes a bar are dropped."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        line = text.strip("\r\n ")
        if line:
            self.stream.write(line + "\n")
            self.flush()
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(*args: Any, **kwargs: Any) -> tqdm:
    """A tqdm bar (same arguments) that degrades to sparse plain lines off a terminal.

    Off a terminal ``disable=None`` (tqdm: "off when not a terminal") prints the lines too; pass
    ``disable=True`` for no output.
    """
    stream = kwargs.get("file") or sys.stderr
    if hasattr(stream, "isatty") and stream.isatty():
        kwargs.setdefault("dynamic_ncols", True)
        return tqdm(*args, **kwargs)
    interval = max(kwargs.get("mininterval", 0.0), LOG_INTERVAL_S)
    kwargs.update(file=_Lines(stream), mininterval=interval,
                  maxinterval=max(kwargs.get("maxinterval", 10.0), interval),
                  leave=True)  # the closing line is the record of the work
    kwargs.setdefault("ncols", 100)
    return tqdm(*args, **kwargs)
