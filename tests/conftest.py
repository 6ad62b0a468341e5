"""Fixtures shared by every test package: the real data beside the repo, one torch thread."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the repository (Flickr8k); skips the test when it is absent."""
    if not (SHARED_DATA / "f8k" / "test_caps.txt").exists():
        pytest.skip(f"real data not found at {SHARED_DATA} (../shared/data beside the repo); "
                    "this test needs Flickr8k")
    return SHARED_DATA


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op torch thread for a module of tiny forwards (OpenMP spin-waiting on a shared
    2-core machine costs more than it gains); results are unchanged."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
