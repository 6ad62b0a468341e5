"""Fixtures shared by every test package: the real data beside the repo, one torch thread."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from tests.threads import one_torch_thread

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the repository (Flickr8k); skips the test when it is absent."""
    if not (SHARED_DATA / "f8k" / "test_caps.txt").exists():
        pytest.skip(f"real data not found at {SHARED_DATA} (../shared/data beside the repo); "
                    "this test needs Flickr8k")
    return SHARED_DATA


@pytest.fixture(scope="module", name="one_torch_thread")
def one_torch_thread_fixture() -> Iterator[None]:
    """One torch thread for a module of tiny forwards (`tests.threads.one_torch_thread`)."""
    with one_torch_thread():
        yield
