"""``cache.progress.progress_bar``: plain whole lines off a terminal, tqdm's redrawn bar on one."""
from __future__ import annotations

import io

import pytest
from tqdm import tqdm

import cache.progress
from cache.progress import progress_bar


class Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def run(stream: io.StringIO, total: int = 10, **kwargs) -> str:
    with progress_bar(total=total, desc="work", unit="img", file=stream, **kwargs) as bar:
        for _ in range(total):
            bar.update(1)
    return stream.getvalue()


def test_off_a_terminal_a_start_line_and_a_final_line_with_the_total(monkeypatch):
    monkeypatch.setattr(cache.progress, "LOG_INTERVAL_S", 1e9)  # no interval line, whatever the clock
    out = run(io.StringIO())
    assert "\r" not in out and out.endswith("\n")
    lines = out.splitlines()
    assert len(lines) == 2  # no line between the start line and the closing one
    assert lines[0].startswith("work:") and "0/10" in lines[0]
    assert lines[-1].startswith("work: 100%") and "10/10" in lines[-1] and "img/s" in lines[-1]


def test_off_a_terminal_lines_follow_the_interval_and_close_twice_is_harmless(monkeypatch):
    monkeypatch.setattr(cache.progress, "LOG_INTERVAL_S", 0.0)  # a line at every update
    stream = io.StringIO()
    bar = progress_bar(total=3, initial=1, desc="work", file=stream, leave=False, disable=None)
    bar.update(1)
    bar.update(1)
    bar.close()
    bar.close()
    lines = stream.getvalue().splitlines()
    assert [line.split("|")[-1].split()[0] for line in lines] == ["1/3", "2/3", "3/3", "3/3"]
    assert all(line.strip() for line in lines) and "\r" not in stream.getvalue()


def test_disabled_writes_nothing():
    assert run(io.StringIO(), disable=True) == ""


def test_on_a_terminal_it_is_plain_tqdm():
    stream = Terminal()
    with progress_bar(total=3, desc="work", file=stream) as bar:
        assert type(bar) is tqdm and bar.dynamic_ncols
        bar.update(3)
    assert stream.getvalue().startswith("\rwork:") and "3/3" in stream.getvalue()


@pytest.mark.parametrize("stream", [io.StringIO(), Terminal()])
def test_same_interface_as_tqdm(stream):
    with progress_bar(range(4), desc="loop", file=stream) as bar:
        assert list(bar) == [0, 1, 2, 3]
    assert bar.n == 4
