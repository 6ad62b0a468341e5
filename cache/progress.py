"""Progress of long work: a tqdm bar on a terminal, plain lines in a log file.

On a terminal the bar redraws in place. When the stream is not a terminal (``nohup``, a log file,
CI) ``progress_bar`` writes one complete line (``desc: pct|bar| n/total [elapsed<remaining,
rate]``) when it starts, about every ``LOG_INTERVAL_S`` seconds while it runs (tqdm's own timing),
and a last one with the total and the overall rate when it is closed; no carriage returns and no
blank lines.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Any, Iterator, TextIO

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


@contextmanager
def no_loading_bar_off_a_terminal() -> Iterator[None]:
    """Turn transformers' progress bars ("Loading weights", "Writing model shards") off inside the
    block when stderr is not a terminal: they redraw with carriage returns, which a log file
    (nohup) would keep."""
    from transformers.utils import logging as hf_logging

    if sys.stderr.isatty() or not hf_logging.is_progress_bar_enabled():
        yield
        return
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()
