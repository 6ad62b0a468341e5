"""``cli serve``: a small search site over an index, on the standard library's HTTP server.

* ``/``: a page with a query box; its script asks ``/api/search`` and shows a grid of thumbnails
  with rank, score and path;
* ``/api/search?q=TEXT&k=N``: the `search.query.Results` as JSON (``{"error": ...}``, status 400,
  for a query the user can fix);
* ``/thumb?path=P`` and ``/photo?path=P``: a thumbnail or the file of an indexed photo. ``P`` must
  be a photo of the index (in its printable form, as the JSON gives it), and its resolved file must
  lie inside the resolved photo folder (unless the index was built with ``--follow-links``):
  nothing outside the indexed folder is ever served. A photo is sent with the content type of the
  format it decodes as (never one a browser would run); a photo that no longer reads or decodes is
  answered 404 or 500 with a line of text.

A web page in the user's browser must not reach the site (DNS rebinding, cross-site requests):

* every request must name the server by ``127.0.0.1``, ``localhost``, ``[::1]`` or the ``--host``
  it listens on (any IP address when that is ``0.0.0.0`` / ``::``: an address cannot be rebound),
  with the server's port, in its ``Host`` header; other names get 403;
* every request must carry the server's random token: ``?token=T`` in the address that ``cli
  serve`` prints (the page then sets a ``SameSite=Strict``, ``HttpOnly`` cookie for the requests
  that follow), the cookie, or an ``Authorization: token T`` header; without it, 403;
* every answer has ``X-Content-Type-Options: nosniff``, a Content-Security-Policy (the page's own
  script and style by nonce, images and requests to itself only, ``frame-ancestors 'none'``),
  ``X-Frame-Options: DENY`` and ``Referrer-Policy: no-referrer``.

Before each request the index is re-read when ``cli index`` rewrote it (`Index.refresh`). Queries
run one at a time (a lock around the model); files are served concurrently.
"""
from __future__ import annotations

import errno
import hmac
import io
import ipaddress
import json
import secrets
import socket
import sys
import threading
from http import HTTPStatus
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from PIL import Image, UnidentifiedImageError

from cache.errors import InputError
from extract.datasets import ImageDecodeError, open_regular
from search.folder import printable
from search.gallery import STYLE, thumbnail_jpeg
from search.query import Index

PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>photo search</title>
<style nonce="%(nonce)s">%(style)s form{margin-bottom:1em} #q{width:28em;font-size:1.1em}</style>
</head><body>
<form id="search"><input id="q" name="q" placeholder="a dog running on the beach" autofocus>
<button type="submit">search</button> <span id="status"></span></form>
<div class="grid" id="results"></div>
<script nonce="%(nonce)s">
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
LOCAL_NAMES = ("127.0.0.1", "localhost", "[::1]")
WILDCARDS = ("0.0.0.0", "::", "")
FORBIDDEN_TOKEN = (b"forbidden: open the address with its token that cli serve printed "
                   b"(http://HOST:PORT/?token=...)")


def indexed_file(root: Path, names: dict[str, str], name: str,
                 follow_links: bool = False) -> Path | None:
    """The file of an indexed photo, or None unless ``name`` is the printable name of one of the
    indexed paths (``names``: printable -> path) that is a regular file and, unless
    ``follow_links``, whose resolved file lies inside the resolved photo folder ``root``."""
    if name not in names:
        return None
    root = root.resolve()
    file = (root / names[name]).resolve()
    inside = follow_links or file.is_relative_to(root)
    return file if inside and file.is_file() else None


def _host_name(host: str) -> str:
    """``host`` as it appears in a ``Host`` header or URL (an IPv6 address in brackets)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _split_host(header: str) -> tuple[str, str] | None:
    """``(name, port)`` of a ``Host`` header (port "" when none), lower case; None if malformed."""
    header = header.strip().lower()
    if header.startswith("["):                       # [IPv6]:port
        name, bracket, rest = header[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            return None
        return f"[{name}]", rest[1:]
    name, _, port = header.partition(":")
    return name, port


def host_allowed(header: str | None, host: str, port: int) -> bool:
    """Whether a ``Host`` header names this server: a local name or the ``--host`` it listens on
    (any IP address when that is a wildcard), with its ``port`` (none: port 80)."""
    parts = _split_host(header or "")
    if parts is None or not parts[0]:
        return False
    name, given = parts
    if given != str(port) and not (given == "" and port == 80):
        return False
    if name in LOCAL_NAMES or name == _host_name(host).lower():
        return True
    if host not in WILDCARDS:
        return False
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return False
    return True


def photo_bytes(file: Path) -> tuple[bytes, str]:
    """A photo file's bytes and the content type of the format it decodes as (`ImageDecodeError`
    when it no longer reads or is no image)."""
    try:
        with open_regular(file) as handle:
            data = handle.read()
        with Image.open(io.BytesIO(data)) as image:
            kind = Image.MIME.get(image.format or "", "application/octet-stream")
    except FileNotFoundError:
        raise ImageDecodeError(f"{file}: image file not found") from None
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as err:
        raise ImageDecodeError(f"{file}: cannot decode image: {err}") from None
    return data, kind


class SearchServer(ThreadingHTTPServer):
    """The threading HTTP server of an index, with its token and the address to open."""

    def __init__(self, address: tuple[str, int], handler: type, family: int, index: Index,
                 token: str) -> None:
        self.address_family = family
        self.index = index
        self.token = token
        super().__init__(address, handler)

    @property
    def url(self) -> str:
        """The address to open in a browser, token included."""
        host = self.server_address[0]
        host = "127.0.0.1" if host in WILDCARDS else _host_name(host)
        return f"http://{host}:{self.server_port}/?token={self.token}"


def _listen_error(err: OSError, host: str, port: int) -> InputError:
    """The one-line error of a server that cannot listen on ``host:port``."""
    if err.errno == errno.EADDRINUSE:
        return InputError(f"--port {port}: already in use on {host} (another server?); pick "
                          "another port, or --port 0 for any free one")
    if err.errno == errno.EADDRNOTAVAIL:
        return InputError(f"--host {host}: not an address of this machine")
    if err.errno == errno.EACCES:
        return InputError(f"--port {port}: permission denied (ports below 1024 need root)")
    return InputError(f"cannot listen on {host}:{port}: {err.strerror or err}")


def make_server(index: Index, host: str = "127.0.0.1", port: int = 8000, k: int = 20,
                token: str | None = None) -> SearchServer:
    """A threading HTTP server of ``index`` bound to ``host:port`` (port 0: a free one) with
    ``token`` (default: a random one); call ``serve_forever``. InputError (one line) when it
    cannot listen there."""
    if not 0 <= port <= 65535:
        raise InputError(f"--port {port}: not a port (0 to 65535)")
    try:
        family = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM)[0][0]
    except (socket.gaierror, UnicodeError) as err:
        raise InputError(f"--host {host}: unknown host ({getattr(err, 'strerror', err)})") from None
    lock = threading.Lock()
    token = token or secrets.token_urlsafe(24)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            """Quiet: no line per request."""

        def _send(self, status: int, body: bytes, content_type: str, nonce: str = "",
                  cookie: str | None = None) -> None:
            source = f"'nonce-{nonce}'" if nonce else "'none'"
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Content-Security-Policy",
                             f"default-src 'none'; img-src 'self'; connect-src 'self'; "
                             f"script-src {source}; style-src {source}; base-uri 'none'; "
                             "form-action 'none'; frame-ancestors 'none'")
            self.send_header("X-Frame-Options", "DENY")
            self.send_header("Referrer-Policy", "no-referrer")
            self.send_header("Cache-Control", "no-store")
            if cookie is not None:
                self.send_header("Set-Cookie", cookie)
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, payload: dict[str, Any]) -> None:
            self._send(status, json.dumps(payload).encode(), "application/json")

        def _text(self, status: int, message: str | bytes) -> None:
            body = message if isinstance(message, bytes) else message.encode()
            self._send(status, body, "text/plain; charset=utf-8")

        def _token_given(self, params: dict[str, str]) -> bool:
            cookies = SimpleCookie()
            try:
                cookies.load(self.headers.get("Cookie", ""))
            except Exception:           # a malformed cookie header: as if there were none
                cookies = SimpleCookie()
            given = [params.get("token", ""), self.headers.get("Authorization", "")
                     .removeprefix("token ")]
            if (morsel := cookies.get(self._cookie_name)) is not None:
                given.append(morsel.value)
            return any(hmac.compare_digest(value.encode(), token.encode()) for value in given)

        @property
        def _cookie_name(self) -> str:
            return f"photo_search_{self.server.server_port}"

        def do_GET(self) -> None:
            try:
                self._route()
            except (BrokenPipeError, ConnectionResetError):
                pass
            except Exception as err:    # a server answers every request, and says why
                print(f"error: {self.command} {printable(self.path)}: {err!r}", file=sys.stderr)
                self._text(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error: {err}")

        def _route(self) -> None:
            if not host_allowed(self.headers.get("Host"), host, self.server.server_port):
                self._text(HTTPStatus.FORBIDDEN, b"forbidden: unknown Host (this server answers "
                                                 b"only to its own address)")
                return
            url = urlparse(self.path)
            params = {key: values[0] for key, values in parse_qs(url.query).items()}
            if not self._token_given(params):
                self._text(HTTPStatus.FORBIDDEN, FORBIDDEN_TOKEN)
                return
            if index.stale():                 # cli index rewrote it: read it again, between queries
                with lock:
                    index.refresh()
            root, names, follow = index.root, index.names, index.follow_links
            if url.path == "/":
                nonce = secrets.token_urlsafe(16)
                page = PAGE % {"style": STYLE, "k": k, "nonce": nonce}
                cookie = (f"{self._cookie_name}={token}; Path=/; HttpOnly; SameSite=Strict")
                self._send(HTTPStatus.OK, page.encode(), "text/html; charset=utf-8", nonce,
                           cookie)
            elif url.path == "/api/search":
                self._search(params)
            elif url.path in ("/thumb", "/photo"):
                self._photo(root, names, follow, params.get("path", ""),
                            thumbnail=url.path == "/thumb")
            else:
                self._text(HTTPStatus.NOT_FOUND, "not found")

        def _search(self, params: dict[str, str]) -> None:
            try:
                count = int(params.get("k", k))
                with lock:
                    results = index.query_text(params.get("q", ""), count)
            except (InputError, ValueError) as err:
                self._json(HTTPStatus.BAD_REQUEST, {"error": str(err)})
                return
            self._json(HTTPStatus.OK, results.to_dict())

        def _photo(self, root: Path, names: dict[str, str], follow: bool, name: str,
                   thumbnail: bool) -> None:
            file = indexed_file(root, names, name, follow)
            if file is None:
                self._text(HTTPStatus.NOT_FOUND, "not an indexed photo (or no longer there)")
                return
            try:
                if thumbnail:
                    body, kind = thumbnail_jpeg(file), "image/jpeg"
                else:
                    body, kind = photo_bytes(file)
            except ImageDecodeError as err:
                self._text(HTTPStatus.INTERNAL_SERVER_ERROR,
                           f"{printable(name)}: {str(err).removeprefix(f'{file}: ')}; run cli "
                           "index again to update the index")
                return
            self._send(HTTPStatus.OK, body, kind)

    try:
        return SearchServer((host, port), Handler, family, index, token)
    except OSError as err:
        raise _listen_error(err, host, port) from None
