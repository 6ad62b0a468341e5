"""``cli serve``: the JSON endpoint, photos served only from inside the indexed folder, and the
page driven in a real headless Chromium (selenium): type a query, see the expected photo first."""
from __future__ import annotations

import json
import os
import shutil
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

import search
from search.index import build_index
from search.query import Index
from search.server import indexed_file, make_server
from tests.search.world import PhotoWorld

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
HANG_GUARD_S = 3600   # selenium needs a deadline: this one only stops a hung browser, never a slow one


@pytest.fixture(scope="module")
def served(photo_world: PhotoWorld, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[tuple[Index, str, Path]]:
    """An index of the photos plus a symlink to a photo outside the folder, served on a free
    port; yields the index, the base URL and the outside photo."""
    root = tmp_path_factory.mktemp("serve")
    photos = Path(shutil.copytree(photo_world.photos, root / "photos"))
    outside = root / "outside.jpg"
    shutil.copy(photos / photo_world.good[0], outside)
    os.symlink(outside, photos / "link.jpg")
    build_index(photos, photo_world.checkpoint, root / "index", progress=False)
    index = search.open_index(root / "index")
    server = make_server(index, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield index, f"http://127.0.0.1:{server.server_port}", outside
    finally:
        server.shutdown()
        server.server_close()


def _get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url) as reply:
            return reply.status, reply.headers["Content-Type"], reply.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read()


def test_json_endpoint_and_photos_only_from_inside_the_folder(
        served: tuple[Index, str, Path], photo_world: PhotoWorld) -> None:
    index, base, outside = served
    status, kind, body = _get(f"{base}/api/search?q=a+blue+square&k=4")
    assert status == 200 and kind == "application/json"
    assert [h["path"] for h in json.loads(body)["hits"]] == [
        h.path for h in index.query_text("a blue square", 4).hits]
    status, _, body = _get(f"{base}/api/search?q=")
    assert status == 400 and "empty" in json.loads(body)["error"]

    good = photo_world.good[1]
    status, kind, body = _get(f"{base}/thumb?path={good}")
    assert status == 200 and kind == "image/jpeg" and body[:2] == b"\xff\xd8"
    status, _, body = _get(f"{base}/photo?path={good}")
    assert status == 200 and body == (index.root / good).read_bytes()
    assert "link.jpg" in index.paths.values()                       # indexed, but points out
    for path in ("link.jpg", "../outside.jpg", str(outside), "notes.txt", "/etc/passwd"):
        assert _get(f"{base}/photo?path={path}")[0] == 404, path
        assert indexed_file(index.root, set(index.paths.values()), path) is None, path


def _browser(tmp_path: Path):
    """A headless Chromium driven by selenium; skips only outside CI when it is not installed."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} / {CHROMEDRIVER} missing in CI (.ci/run installs them)")
        pytest.skip(f"no headless browser: {CHROMIUM} and {CHROMEDRIVER} are not installed "
                    "(apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


def test_the_page_in_a_headless_browser(served: tuple[Index, str, Path], tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    index, base, _ = served
    expected = index.query_text("a green triangle", 20).hits[0].path
    driver = _browser(tmp_path)
    try:
        driver.get(base + "/")
        box = driver.find_element(By.ID, "q")
        box.send_keys("a green triangle")
        driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        WebDriverWait(driver, HANG_GUARD_S).until(
            ready.presence_of_element_located((By.CSS_SELECTOR, "#results figure.hit")))
        first = driver.find_element(By.CSS_SELECTOR, "#results figure.hit")
        assert first.get_attribute("data-path") == expected
        WebDriverWait(driver, HANG_GUARD_S).until(lambda d: d.execute_script(
            "const i = document.querySelector('#results img'); "
            "return i.complete && i.naturalWidth > 0;"))
        assert driver.save_screenshot(str(tmp_path / "search.png"))
        assert (tmp_path / "search.png").stat().st_size > 0
    finally:
        driver.quit()
