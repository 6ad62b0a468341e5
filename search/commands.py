"""The click commands ``cli index``, ``cli search`` and ``cli serve``."""
from __future__ import annotations

import json

import click

from cache.device import resolve_device
from cache.errors import InputError
from search import ann


@click.command("index")
@click.argument("images", type=click.Path(file_okay=False))
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False),
              help="A run's best.pt with an embedding branch (linear, vse, hrem, tgdt, aladin).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="The index folder (created; updated incrementally when it exists; a folder "
                   "with other files is refused).")
@click.option("--kind", type=click.Choice(ann.KINDS), default="flat", show_default=True,
              help="faiss index: exact, HNSW graph, or compressed IVF-PQ.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--batch-size", type=int, default=32, show_default=True, help="Photos per batch.")
@click.option("--workers", type=int, default=0, show_default=True,
              help="Decoding processes (0: decode in this process).")
@click.option("--follow-links", is_flag=True,
              help="Also follow symbolic links that lead out of IMAGES (default: reported).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def index(images: str, checkpoint: str, out: str, kind: str, device: str, batch_size: int,
          workers: int, follow_links: bool, no_progress: bool) -> None:
    """Index the photos under IMAGES (recursively) with a trained run, into --out."""
    from search.folder import printable
    from search.index import build_index

    report = build_index(images, checkpoint, out, kind, resolve_device(device), batch_size,
                         workers, progress=not no_progress, follow_links=follow_links)
    for skipped in report.skipped:
        click.echo(f"skipped: {printable(skipped.path)}: {skipped.reason}", err=True)
    for bad in report.bad:
        click.echo(f"bad file: {printable(bad.path)}: {bad.reason}", err=True)
    for note in report.notes:
        click.echo(f"note: {note}", err=True)
    click.echo(report.summary())


@click.command("search")
@click.argument("index_dir", type=click.Path(file_okay=False))
@click.argument("query", required=False)
@click.option("--image", type=click.Path(dir_okay=False), help="Query by this photo instead.")
@click.option("-k", "k", type=int, default=20, show_default=True, help="Results to show.")
@click.option("--checkpoint", type=click.Path(dir_okay=False),
              help="The run the index was built with, if it moved (default: the manifest's).")
@click.option("--rerank-topk", "rerank", type=int, metavar="K",
              help="Re-score the first max(-k, K) hits of a text query with --fine-checkpoint, "
                   "then show -k.")
@click.option("--fine-checkpoint", "fine", type=click.Path(dir_okay=False),
              help="A run with an interaction branch (scan, laps, caa, tgdt, ...) for "
                   "--rerank-topk.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--html", "html_out", type=click.Path(dir_okay=False),
              help="Also write a gallery page with thumbnails to this file.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
def search(index_dir: str, query: str | None, image: str | None, k: int, checkpoint: str | None,
           rerank: int | None, fine: str | None, as_json: bool, html_out: str | None,
           device: str) -> None:
    """Find the photos of INDEX_DIR that match QUERY (a text) or --image."""
    from search.folder import printable
    from search.gallery import write_gallery
    from search.query import open_index

    if (query is None) == (image is None):
        raise InputError("give a text QUERY or --image PHOTO (one of them)")
    if (rerank is None) != (fine is None) or (rerank is not None and image is not None):
        raise InputError("--rerank-topk K and --fine-checkpoint RUN/best.pt go together, with a "
                         "text query")
    opened = open_index(index_dir, checkpoint, resolve_device(device))
    if image is not None:
        results = opened.query_image(image, k)
    elif rerank is None:
        results = opened.query_text(query, k)
    else:            # re-rank a shortlist of K (however small -k is), then show the first k
        results = opened.rerank(opened.query_text(query, max(k, rerank)), fine, rerank).first(k)
    for note in results.notes:
        click.echo(f"note: {note}", err=True)
    if html_out:
        click.echo(f"gallery: {printable(write_gallery(results, opened.root, html_out))}",
                   err=True)
    if as_json:
        click.echo(json.dumps(results.to_dict(), indent=1))
        return
    click.echo(f"{'rank':>4} {'score':>8}  path")
    for hit in results.hits:
        click.echo(f"{hit.rank:>4} {hit.score:>8.4f}  {printable(opened.file(hit.path))}")


@click.command("serve")
@click.argument("index_dir", type=click.Path(file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="Port (0: any free one).")
@click.option("--checkpoint", type=click.Path(dir_okay=False),
              help="The run the index was built with, if it moved (default: the manifest's).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
def serve(index_dir: str, host: str, port: int, checkpoint: str | None, device: str) -> None:
    """A search page for INDEX_DIR in the browser (query box, result grid, JSON at /api/search).

    Open the printed address: its token lets your browser in, and no other web page."""
    from search.folder import printable
    from search.query import open_index
    from search.server import make_server

    opened = open_index(index_dir, checkpoint, resolve_device(device))
    opened.check()
    server = make_server(opened, host, port)
    click.echo(f"serving {printable(index_dir)} at {server.url} (Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
