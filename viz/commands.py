"""The click commands ``cli plot`` and ``cli explain`` (the work is in ``viz.curves`` and
``viz.explain``, imported when a command runs: matplotlib and the backbones load slowly)."""
from __future__ import annotations

import click


@click.command("plot")
@click.argument("runs", nargs=-1, required=True, type=click.Path())
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="PNG to write.")
@click.option("--eval", "evals", multiple=True, type=click.Path(dir_okay=False),
              help="A cli eval report (eval-<split>.json) to draw as recall bars; repeatable, and "
                   "the .json files after it count too (--eval a.json b.json).")
def plot(runs: tuple[str, ...], out: str, evals: tuple[str, ...]) -> None:
    """Loss, lr and dev rsum per epoch of RUNS (run folders: their log.jsonl) on one figure, plus
    the R@1/5/10 bars of eval reports (*.json among the arguments are reports).

    \b
    cli plot runs/f8k_linear runs/f8k_vse --out curves.png --eval runs/f8k_linear/eval-test.json
    """
    from viz.curves import plot_curves

    folders = [run for run in runs if not run.endswith(".json")]
    reports = [*evals, *(run for run in runs if run.endswith(".json"))]
    if not folders:
        raise click.UsageError("give at least one run folder")
    click.echo(f"wrote {plot_curves(folders, out, reports)}")


@click.command("explain")
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False),
              help="A run's checkpoint (best.pt).")
@click.option("--image", required=True, type=click.Path(dir_okay=False), help="Image file.")
@click.option("--caption", required=True, help="The caption to explain the image for.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="PNG to write.")
@click.option("--word", help="Only this word's panel (word-to-region heads).")
@click.option("--mode", help="Inference branch of a two-branch head (tgdt: global/local, aladin: "
                             "student/teacher); default: the head's own.")
def explain(checkpoint: str, image: str, caption: str, out: str, word: str | None,
            mode: str | None) -> None:
    """Draw what a head used in an image for a caption: LAPS/CAA patch selection (and gate), SCAN
    attention, TGDT/ALADIN word-patch similarity per word; embedding heads say there is none.

    The image and caption run through the backbones recorded in the checkpoint (CPU)."""
    from viz.explain import explain as explain_pair

    explained = explain_pair(checkpoint, image, caption, out, word, mode)
    count = len(explained.words)
    words = f" ({count} word panel{'s' if count != 1 else ''})" if count else ""
    click.echo(f"wrote {out}{words}")
