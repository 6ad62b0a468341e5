"""``cli serve``: a small search site over an index, on the standard library's HTTP server.

* ``/``: a page with a query box; its script asks ``/api/search`` and shows a grid of thumbnails
  with rank, score and path;
* ``/api/search?q=TEXT&k=N``: the `search.query.Results` as JSON (``{"error": ...}``, status 400,
  for a query the user can fix);
* ``/thumb?path=P`` and ``/photo?path=P``: a thumbnail or the file of an indexed photo. ``P`` must
  be a photo of the index, and its resolved file must lie inside the resolved photo folder:
  nothing outside the indexed folder is ever served (a symlink pointing out is refused too).

Queries run one at a time (a lock around the model); files are served concurrently.
"""
from __future__ import annotations

import json
import mimetypes
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from cache.errors import InputError
from search.gallery import STYLE, thumbnail_jpeg
from search.query import Index

PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>photo search</title>
<style>%(style)s form{margin-bottom:1em} #q{width:28em;font-size:1.1em}</style></head><body>
<form id="search"><input id="q" name="q" placeholder="a dog running on the beach" autofocus>
<button type="submit">search</button> <span id="status"></span></form>
<div class="grid" id="results"></div>
<script>
const form = document.getElementById("search"), grid = document.getElementById("results");
const status = document.getElementById("status");
function tile(hit) {
  const fig = document.createElement("figure"), link = document.createElement("a");
  const img = document.createElement("img"), cap = document.createElement("figcaption");
  const path = encodeURIComponent(hit.path);
  fig.className = "hit"; fig.dataset.path = hit.path;
  link.href = "/photo?path=" + path; img.src = "/thumb?path=" + path; img.alt = hit.path;
  cap.textContent = "#" + hit.rank + " \\u00b7 " + hit.score.toFixed(4) + " " + hit.path;
  link.appendChild(img); fig.append(link, cap); return fig;
}
form.addEventListener("submit", async (event) => {
  event.preventDefault();
  status.textContent = "searching...";
  const q = encodeURIComponent(document.getElementById("q").value);
  const reply = await fetch("/api/search?k=%(k)d&q=" + q);
  const body = await reply.json();
  grid.replaceChildren(...(body.hits || []).map(tile));
  status.textContent = body.error || (body.hits.length + " results " + body.notes.join(" "));
});
</script></body></html>
"""


def indexed_file(root: Path, indexed: set[str], path: str) -> Path | None:
    """The file of an indexed photo, or None unless ``path`` is one of the ``indexed`` paths and
    its resolved file lies inside the resolved photo folder ``root``."""
    if path not in indexed:
        return None
    root = root.resolve()
    file = (root / path).resolve()
    return file if file.is_relative_to(root) and file.is_file() else None


def make_server(index: Index, host: str = "127.0.0.1", port: int = 8000,
                k: int = 20) -> ThreadingHTTPServer:
    """A threading HTTP server of ``index`` bound to ``host:port`` (port 0: a free one); call
    ``serve_forever``."""
    lock = threading.Lock()
    indexed = set(index.paths.values())

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            """Quiet: no line per request."""

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, payload: dict[str, Any]) -> None:
            self._send(status, json.dumps(payload).encode(), "application/json")

        def do_GET(self) -> None:
            url = urlparse(self.path)
            params = {key: values[0] for key, values in parse_qs(url.query).items()}
            if url.path == "/":
                page = PAGE % {"style": STYLE, "k": k}
                self._send(HTTPStatus.OK, page.encode(), "text/html; charset=utf-8")
            elif url.path == "/api/search":
                self._search(params)
            elif url.path in ("/thumb", "/photo"):
                self._photo(params.get("path", ""), thumbnail=url.path == "/thumb")
            else:
                self._send(HTTPStatus.NOT_FOUND, b"not found", "text/plain")

        def _search(self, params: dict[str, str]) -> None:
            try:
                count = int(params.get("k", k))
                with lock:
                    results = index.query_text(params.get("q", ""), count)
            except (InputError, ValueError) as err:
                self._json(HTTPStatus.BAD_REQUEST, {"error": str(err)})
                return
            self._json(HTTPStatus.OK, results.to_dict())

        def _photo(self, path: str, thumbnail: bool) -> None:
            file = indexed_file(index.root, indexed, path)
            if file is None:
                self._send(HTTPStatus.NOT_FOUND, b"not an indexed photo", "text/plain")
            elif thumbnail:
                self._send(HTTPStatus.OK, thumbnail_jpeg(file), "image/jpeg")
            else:
                kind = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
                self._send(HTTPStatus.OK, file.read_bytes(), kind)

    return ThreadingHTTPServer((host, port), Handler)
