"""``cli check-fit``: can each configured head fit a few hundred training pairs?

The command parses options and prints; the work is ``train.fit_check.fit_pairs``.
"""
from __future__ import annotations

import json
from pathlib import Path

import click
import torch

from cache.store import ImageCache, TextCache
from train.config import cache_paths, load_config
from train.fit_check import FIT_TARGET, fit_pairs, format_fit_table


@click.command("check-fit")
@click.option("--config", "configs", multiple=True, required=True,
              type=click.Path(dir_okay=False),
              help="Run config whose head, loss and lr are checked (repeatable: one row each).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a key of every config, e.g. --set optim.lr=1e-3 (repeatable).")
@click.option("--num-images", default=100, show_default=True, type=click.IntRange(min=2),
              help="Fit the first N training images and all of their captions.")
@click.option("--max-steps", default=2000, show_default=True, type=click.IntRange(min=1),
              help="Give up after this many optimisation steps.")
@click.option("--check-every", default=100, show_default=True, type=click.IntRange(min=1),
              help="Measure recall on the fitted pairs every N steps.")
@click.option("--target", default=FIT_TARGET, show_default=True,
              type=click.FloatRange(0, 1), help="R@1 (both directions, every trained branch) to reach.")
@click.option("--threads", default=0, type=click.IntRange(min=0),
              help="torch CPU threads (0: torch's default).")
@click.option("--report", type=click.Path(dir_okay=False),
              help="Write the results as JSON here.")
def check_fit(configs: tuple[str, ...], overrides: tuple[str, ...], num_images: int,
              max_steps: int, check_every: int, target: float, threads: int,
              report: str | None) -> None:
    """Train each config's head on a few hundred training pairs until it recalls them.

    A head that cannot reach R@1 >= --target on pairs it was trained on has a bug, not a recipe
    problem. Exit status 1 when some head does not fit.

    \b
    cli check-fit --config configs/f8k_linear.yaml --config configs/f8k_tgdt.yaml
    """
    if threads:
        torch.set_num_threads(threads)
    results = []
    for path in configs:
        config = load_config(path, overrides)
        image_path, text_path = cache_paths(config, config["data"]["train_split"])
        result = fit_pairs(config, ImageCache(image_path), TextCache(text_path),
                           num_images=num_images, max_steps=max_steps, check_every=check_every,
                           target=target, seed=config["run"]["seed"],
                           log=lambda line: click.echo(line, err=True))
        results.append((path, result))
    click.echo(format_fit_table(results, target))
    if report:
        Path(report).parent.mkdir(parents=True, exist_ok=True)
        Path(report).write_text(json.dumps(
            {"num_images": num_images, "target": target, "overrides": list(overrides),
             "results": {label: r.to_dict() for label, r in results}}, indent=2) + "\n")
    if not all(r.reached for _, r in results):
        raise click.exceptions.Exit(1)
