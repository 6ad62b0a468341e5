"""Thumbnails and the static result page of ``cli search --html``.

`thumbnail_jpeg` makes a small upright JPEG of a photo with Pillow (also served by ``cli serve``);
`write_gallery` writes one self-contained HTML file whose thumbnails are data URIs (the page can be
mailed or moved; it does not depend on the photo folder) and which links each thumbnail to the
photo's file.
"""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from cache.errors import InputError
from extract.datasets import load_rgb
from search.query import Results

THUMBNAIL_PX = 192

STYLE = """body{font-family:sans-serif;margin:1.5em;background:#fafafa}
.grid{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;width:200px;background:#fff;padding:4px;box-shadow:0 1px 3px #0003}
figure img{width:192px;height:192px;object-fit:contain;background:#eee}
figcaption{font-size:12px;overflow-wrap:anywhere}"""


def thumbnail_jpeg(path: str | Path, size: int = THUMBNAIL_PX) -> bytes:
    """A JPEG of the photo fitted into ``size`` x ``size`` (EXIF orientation applied)."""
    image = load_rgb(path)
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def figure(rank: int, score: float, path: str, src: str, href: str) -> str:
    """One result tile: thumbnail, rank, score and path."""
    return (f'<figure class="hit" data-path="{html.escape(path)}"><a href="{html.escape(href)}">'
            f'<img src="{src}" alt="{html.escape(path)}"></a>'
            f"<figcaption>#{rank} &middot; {score:.4f}<br>{html.escape(path)}</figcaption>"
            "</figure>")


def write_gallery(results: Results, root: Path, out: str | Path) -> Path:
    """Write the HTML page of ``results`` (photos under ``root``) to ``out``."""
    tiles = []
    for hit in results.hits:
        data = base64.b64encode(thumbnail_jpeg(root / hit.path)).decode()
        tiles.append(figure(hit.rank, hit.score, hit.path, f"data:image/jpeg;base64,{data}",
                            (root / hit.path).as_uri()))
    notes = "".join(f"<p><em>{html.escape(note)}</em></p>" for note in results.notes)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>"
            f"{html.escape(results.query)}</title><style>{STYLE}</style></head><body>"
            f"<h1>{html.escape(results.query)}</h1>{notes}<div class='grid'>{''.join(tiles)}</div>"
            "</body></html>\n")
    out = Path(out)
    try:
        out.write_text(page, encoding="utf-8")
    except OSError as err:
        raise InputError(f"{out}: cannot write the gallery page ({err.strerror})") from None
    return out
