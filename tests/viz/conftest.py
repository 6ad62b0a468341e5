"""The tiny trained world shared by the picture tests (built once per session)."""
from __future__ import annotations

import pytest

from tests.threads import one_torch_thread
from tests.viz.world import VizWorld, make_viz_world


@pytest.fixture(scope="session")
def viz_world(tmp_path_factory: pytest.TempPathFactory) -> VizWorld:
    with one_torch_thread():
        return make_viz_world(tmp_path_factory.mktemp("viz"))
