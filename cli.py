"""Command line of the toolkit: ``cli extract``, ``cli train-head``, ``cli eval``, ...

The commands live beside the code they drive (``extract/commands.py``, ``cache/commands.py``,
``train/commands.py``, ``viz/commands.py``, ``search/commands.py``); this module only groups
them. Errors the user can fix (``InputError``) are printed as one line and exit with status 2.
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no weight-loading reports on stderr

import click  # noqa: E402

from cache.commands import info  # noqa: E402
from cache.errors import InputError  # noqa: E402
from extract.commands import demo_data, extract, import_precomp  # noqa: E402
from search.commands import index, search, serve  # noqa: E402
from train.commands import eval_command, export_backbone, train_head  # noqa: E402
from train.fit_commands import check_fit  # noqa: E402
from viz.commands import explain, plot  # noqa: E402


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Cache backbone features once; train and evaluate image-text retrieval heads from them."""


for command in (extract, import_precomp, demo_data, info, train_head, check_fit, eval_command,
                export_backbone, plot, explain, index, search, serve):
    cli.add_command(command)


def main() -> None:
    """Console-script entry point."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except InputError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
