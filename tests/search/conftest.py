"""The photo world, built once per test session (extraction and one training run)."""
from __future__ import annotations

import pytest

from tests.threads import one_torch_thread
from tests.search.world import PhotoWorld, make_photo_world


@pytest.fixture(scope="session")
def photo_world(tmp_path_factory: pytest.TempPathFactory) -> PhotoWorld:
    with one_torch_thread():
        return make_photo_world(tmp_path_factory.mktemp("photos"))
