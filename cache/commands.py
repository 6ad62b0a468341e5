"""``cli info``: print a cache file's schema and whether it is complete and valid."""
from __future__ import annotations

import json
import sys

import click

from cache.store import describe


@click.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON.")
def info(files: tuple[str, ...], as_json: bool) -> None:
    """Describe cache FILES: datasets, attributes, complete/valid. Exit 1 if any is not valid."""
    reports = [describe(f) for f in files]
    if as_json:
        click.echo(json.dumps(reports, indent=2, default=str))
    else:
        for r in reports:
            status = "complete, valid" if r["valid"] else f"NOT VALID: {r.get('problem')}"
            click.echo(f"{r['path']}: {status}")
            for name, d in sorted(r.get("datasets", {}).items()):
                click.echo(f"  {name:<12} {str(tuple(d['shape'])):<22} {d['dtype']}")
            for key, value in sorted(r.get("attributes", {}).items()):
                click.echo(f"  @{key:<15} {value}")
    if not all(r["valid"] for r in reports):
        sys.exit(1)
