"""Shared fixtures. Helpers append fixtures below; keep each one small and documented."""
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
