"""``cli info``: print a cache file's schema and whether it is complete and valid.

A ``.partial`` file can be described while an extraction writes it (read without the file lock): it
is reported as partial with the rows committed so far.
"""
from __future__ import annotations

import json
import sys

import click

from cache.store import describe


@click.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON.")
def info(files: tuple[str, ...], as_json: bool) -> None:
    """Describe cache FILES: datasets, attributes, complete/valid. Exit 1 if any is not valid.

    A FILE ending in .h5.partial (an extraction in progress or interrupted) is reported with the
    rows committed so far.
    """
    reports = [describe(f) for f in files]
    if as_json:
        click.echo(json.dumps(reports, indent=2, default=str))
    else:
        for r in reports:
            if r["valid"]:
                status = "complete, valid"
            else:
                status = f"{'PARTIAL' if r['partial'] else 'NOT VALID'}: {r.get('problem')}"
            click.echo(f"{r['path']}: {status}")
            if r.get("weights_note"):
                click.echo(f"  weights: {r['weights_note']}")
            if r.get("views_line"):
                click.echo(f"  views: {r['views_line']}")
            for name, d in sorted(r.get("datasets", {}).items()):
                click.echo(f"  {name:<12} {str(tuple(d['shape'])):<22} {d['dtype']}")
            for key, value in sorted(r.get("attributes", {}).items()):
                click.echo(f"  @{key:<15} {value}")
    if not all(r["valid"] for r in reports):
        sys.exit(1)
