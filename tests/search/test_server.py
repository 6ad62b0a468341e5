"""``cli serve``: the JSON endpoint, photos served only from inside the indexed folder with the
content type they decode as, a foreign Host and a missing token refused, security headers, a
re-index noticed, start-up errors as one line, and the page driven in a real headless Chromium
(selenium) through the printed address with its token: type a query, see the expected photo
first."""
from __future__ import annotations

import json
import os
import shutil
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import pytest
import torch
from PIL import Image

import search
from cache.errors import InputError
from heads.checkpoint import load_checkpoint
from search.index import build_index
from search.query import Index
from search.server import SearchServer, indexed_file, make_server
from tests.extract.cli_helpers import run_cli
from tests.search.world import PhotoWorld

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
HANG_GUARD_S = 3600   # selenium needs a deadline: this one only stops a hung browser, never a slow one


@dataclass(frozen=True)
class Served:
    """A running server: its index, the printed address (with the token), its base URL."""

    index: Index
    url: str
    token: str
    outside: Path

    @property
    def base(self) -> str:
        return self.url.split("/?")[0]


@contextmanager
def serving(index: Index) -> Iterator[SearchServer]:
    server = make_server(index, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def served(photo_world: PhotoWorld, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """An index of the photos with a symlink to a photo outside the folder (followed: as if the
    link was made after indexing), served on a free port."""
    root = tmp_path_factory.mktemp("serve")
    photos = Path(shutil.copytree(photo_world.photos, root / "photos"))
    outside = root / "outside.jpg"
    shutil.copy(photos / photo_world.good[0], outside)
    build_index(photos, photo_world.checkpoint, root / "index", progress=False)
    shutil.copy(photos / photo_world.good[2], photos / "link.jpg")
    build_index(photos, photo_world.checkpoint, root / "index", progress=False)
    (photos / "link.jpg").unlink()
    os.symlink(outside, photos / "link.jpg")
    with serving(search.open_index(root / "index")) as server:
        yield Served(server.index, server.url, server.token, outside)


def _get(url: str, token: str | None = None, host: str | None = None
         ) -> tuple[int, Any, bytes]:
    """Status, headers and body of a GET (with ``Authorization: token T`` and a ``Host``)."""
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"token {token}")
    if host is not None:
        request.add_header("Host", host)
    try:
        with urllib.request.urlopen(request) as reply:
            return reply.status, reply.headers, reply.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read()


def test_json_endpoint_and_photos_only_from_inside_the_folder(
        served: Served, photo_world: PhotoWorld) -> None:
    index, base, token = served.index, served.base, served.token
    status, headers, body = _get(f"{base}/api/search?q=a+blue+square&k=4", token)
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert [h["path"] for h in json.loads(body)["hits"]] == [
        h.path for h in index.query_text("a blue square", 4).hits]
    status, _, body = _get(f"{base}/api/search?q=", token)
    assert status == 400 and "empty" in json.loads(body)["error"]

    good = photo_world.good[1]
    status, headers, body = _get(f"{base}/thumb?path={good}", token)
    assert status == 200 and headers["Content-Type"] == "image/jpeg" and body[:2] == b"\xff\xd8"
    status, _, body = _get(f"{base}/photo?path={good}", token)
    assert status == 200 and body == (index.root / good).read_bytes()
    assert "link.jpg" in index.paths.values()              # indexed, but now points out
    for path in ("link.jpg", "../outside.jpg", str(served.outside), "notes.txt", "/etc/passwd"):
        assert _get(f"{base}/photo?path={path}", token)[0] == 404, path
        assert indexed_file(index.root, index.names, path) is None, path


def test_a_foreign_host_or_a_missing_token_is_refused_and_headers_guard_the_page(
        served: Served, photo_world: PhotoWorld) -> None:
    base, token, port = served.base, served.token, served.base.rsplit(":", 1)[1]
    good = photo_world.good[1]
    for path in ("/", "/api/search?q=a+dog", f"/photo?path={good}"):
        status, _, body = _get(base + path, token, host=f"evil.example:{port}")   # rebinding
        assert status == 403 and b"Host" in body, path
        status, _, body = _get(base + path)                                         # no token
        assert status == 403 and b"token" in body, path
        assert _get(base + path, "wrong")[0] == 403, path
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}"):
        assert _get(f"{base}/api/search?q=a+dog", token, host=host)[0] == 200, host
    assert _get(f"{base}/api/search?q=a+dog", token, host="127.0.0.1:1")[0] == 403

    status, headers, body = _get(served.url)                  # the printed address: token in it
    assert status == 200 and b"<form" in body
    assert headers["X-Content-Type-Options"] == "nosniff"
    policy = headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in policy and "default-src 'none'" in policy
    nonce = policy.split("'nonce-")[1].split("'")[0]
    assert body.count(f'nonce="{nonce}"'.encode()) == 2                 # its script and style
    cookie = headers["Set-Cookie"]
    assert f"={token}" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    request = urllib.request.Request(f"{base}/api/search?q=a+dog")
    request.add_header("Cookie", cookie.split(";")[0])
    with urllib.request.urlopen(request) as reply:
        assert reply.status == 200
    status, headers, _ = _get(f"{base}/photo?path={good}", token)
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]


def test_content_type_from_the_image_a_photo_that_stops_decoding_and_a_reindex(
        photo_world: PhotoWorld, tmp_path: Path) -> None:
    photos = Path(shutil.copytree(photo_world.photos, tmp_path / "photos"))
    Image.open(photos / photo_world.good[0]).save(photos / "really-a.png.jpg", "PNG")
    odd = os.fsdecode(b"bad\xff\nname.jpg")
    shutil.copy(photos / photo_world.good[0], photos / odd)
    build_index(photos, photo_world.checkpoint, tmp_path / "index", progress=False)
    with serving(search.open_index(tmp_path / "index")) as server:
        base, token = server.url.split("/?")[0], server.token
        status, headers, _ = _get(f"{base}/photo?path=really-a.png.jpg", token)
        assert status == 200 and headers["Content-Type"] == "image/png"
        shown = urllib.parse.quote("bad\\xff\\nname.jpg")   # the name as the JSON gives it
        status, _, body = _get(f"{base}/photo?path={shown}", token)
        assert status == 200 and body == (photos / odd).read_bytes()
        broken = photo_world.good[3]
        (photos / broken).write_bytes(b"<html><script>alert(1)</script></html>")
        for endpoint in ("thumb", "photo"):
            status, headers, body = _get(f"{base}/{endpoint}?path={broken}", token)
            assert status == 500 and headers["Content-Type"].startswith("text/plain"), endpoint
            assert body.decode().startswith(f"{broken}: cannot decode image"), body
        gone = photo_world.good[4]
        (photos / gone).unlink()
        assert _get(f"{base}/thumb?path={gone}", token)[0] == 404
        before = json.loads(_get(f"{base}/api/search?q=a+red+circle&k=20", token)[2])["hits"]
        assert gone in [hit["path"] for hit in before]
        build_index(photos, photo_world.checkpoint, tmp_path / "index", progress=False)
        after = json.loads(_get(f"{base}/api/search?q=a+red+circle&k=20", token)[2])["hits"]
        assert gone not in [hit["path"] for hit in after] and broken not in [
            hit["path"] for hit in after]
        assert len(after) == len(before) - 2


def test_start_up_errors_are_one_line(served: Served, photo_world: PhotoWorld,
                                      tmp_path: Path) -> None:
    index, port = served.index, int(served.base.rsplit(":", 1)[1])
    with pytest.raises(InputError, match=rf"--port {port}: already in use on 127.0.0.1"):
        make_server(index, "127.0.0.1", port)
    with pytest.raises(InputError, match="--host no-such-host.invalid: unknown host"):
        make_server(index, "no-such-host.invalid", 0)
    with pytest.raises(InputError, match="--port 99999: not a port"):
        make_server(index, "127.0.0.1", 99999)
    with pytest.raises(click.BadParameter, match="99999"):
        run_cli("serve", index.folder, "--port", 99999)
    state = load_checkpoint(photo_world.checkpoint)
    other = tmp_path / "other.pt"
    torch.save({k: v for k, v in state.items() if k != "path"} | {"epoch": 99}, other)
    code, message = run_cli("serve", index.folder, "--checkpoint", other, "--port", 0)
    assert code == 2 and "--checkpoint" in message and "SHA-256 differs" in message, message


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


def test_the_page_in_a_headless_browser(served: Served, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    expected = served.index.query_text("a green triangle", 20).hits[0].path
    driver = _browser(tmp_path)
    try:
        driver.get(served.url)                       # the address cli serve prints
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
