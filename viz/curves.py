"""``cli plot``: loss, learning rate and dev rsum per epoch of runs (their ``log.jsonl``, as
``train.trainer`` writes it), and the recall bars of ``cli eval`` reports, on one figure."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.ticker import MaxNLocator

from cache.errors import InputError
from viz.figure import panel_figure, save_png

LOG = "log.jsonl"
RECALLS = [(f"{direction}_r{k}", f"{label} R@{k}") for direction, label in
           (("i2t", "i2t"), ("t2i", "t2i")) for k in (1, 5, 10)]


@dataclass(frozen=True)
class RunLog:
    """The records of one run's log: epoch records (``kind: epoch``) and step records."""

    name: str
    epochs: list[dict[str, Any]]
    steps: list[dict[str, Any]]


@dataclass(frozen=True)
class EvalReport:
    """One ``cli eval`` report: a label (its run folder) and its metrics."""

    label: str
    split: str
    metrics: dict[str, float]


def read_log(run: str | Path) -> RunLog:
    """The records of ``run/log.jsonl``; InputError for a folder without one, an empty log, or a
    line that is not a JSON record of the trainer (naming the file and line)."""
    run = Path(run)
    path = run / LOG
    if not path.is_file():
        raise InputError(f"{run}: no {LOG} (not a run folder of cli train-head?)")
    epochs, steps = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}: line {number} is not JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not {"kind", "epoch", "step"} <= set(record):
            raise InputError(f"{path}: line {number} is not a training record (kind, epoch, step)")
        (epochs if record["kind"] == "epoch" else steps).append(record)
    if not epochs and not steps:
        raise InputError(f"{path}: empty log (the run wrote no record yet)")
    return RunLog(run.resolve().name, epochs, steps)


def read_eval(path: str | Path) -> EvalReport:
    """A ``cli eval`` JSON report; InputError naming the file when it is missing or has no
    R@1/5/10 both ways and rsum."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: eval report not found")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not JSON (line {exc.lineno}: {exc.msg})") from None
    metrics = report.get("metrics") if isinstance(report, dict) else None
    needed = [key for key, _ in RECALLS] + ["rsum"]
    if not isinstance(metrics, dict) or any(key not in metrics for key in needed):
        raise InputError(f"{path}: not a cli eval report (metrics {', '.join(needed)})")
    checkpoint = report.get("checkpoint")
    label = Path(checkpoint).parent.name if checkpoint else path.stem
    return EvalReport(label, str(report.get("split", "")), {k: float(metrics[k]) for k in needed})


def step_positions(log: RunLog) -> tuple[np.ndarray, np.ndarray]:
    """Step records as (epochs trained, loss): a step of epoch e sits at e + its share of the
    epoch's steps (epoch e's record at e + 1); steps of an epoch without a record are left out."""
    ends = {r["epoch"]: r["step"] for r in log.epochs}
    xs, ys = [], []
    for record in log.steps:
        epoch = record["epoch"]
        if epoch not in ends or "loss" not in record:
            continue
        start = ends.get(epoch - 1, 0)
        xs.append(epoch + (record["step"] - start) / max(1, ends[epoch] - start))
        ys.append(record["loss"])
    return np.asarray(xs), np.asarray(ys)


def _draw_runs(axes: list[Axes], logs: list[RunLog]) -> None:
    """Loss (epoch means, steps faint), lr and dev rsum against the epoch, one colour per run."""
    loss_ax, lr_ax, rsum_ax = axes
    for index, log in enumerate(logs):
        colour = f"C{index % 10}"
        epochs = [r["epoch"] + 1 for r in log.epochs]            # epochs trained
        x_steps, y_steps = step_positions(log)
        if len(x_steps):
            loss_ax.plot(x_steps, y_steps, color=colour, alpha=0.35, linewidth=0.8)
        loss_ax.plot(epochs, [r["loss"] for r in log.epochs], "o-", color=colour, markersize=3,
                     label=log.name)
        lrs = [r["lr"] for r in log.epochs]
        lr_ax.plot([0] + epochs, lrs[:1] + lrs, color=colour, drawstyle="steps-pre")  # (e, e+1]
        rsum_ax.plot(epochs, [r.get("dev", {}).get("rsum", np.nan) for r in log.epochs], "o-",
                     color=colour, markersize=3)
    for ax, title in ((loss_ax, "train loss"), (lr_ax, "learning rate"), (rsum_ax, "dev rsum")):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epochs trained", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    if any(r["lr"] > 0 for log in logs for r in log.epochs):
        lr_ax.set_yscale("log")
    loss_ax.legend(fontsize=7)


def _draw_recalls(ax: Axes, reports: list[EvalReport]) -> None:
    """Grouped bars of R@1/5/10 i2t and t2i, one bar per report; rsum in the legend."""
    width = 0.8 / len(reports)
    positions = np.arange(len(RECALLS))
    for index, report in enumerate(reports):
        values = [report.metrics[key] for key, _ in RECALLS]
        ax.bar(positions + (index - (len(reports) - 1) / 2) * width, values, width,
               color=f"C{index % 10}", label=f"{report.label} (rsum {report.metrics['rsum']:.1f})")
    ax.set_xticks(positions, [label for _, label in RECALLS], rotation=45, fontsize=7)
    ax.set_ylim(0, 100)
    ax.tick_params(labelsize=7)
    splits = sorted({r.split for r in reports if r.split})
    ax.set_title(f"recall on {'/'.join(splits) or 'eval'} (rsum in the legend)", fontsize=9)
    ax.legend(fontsize=6, loc="upper left")
    ax.grid(axis="y", alpha=0.3)


def plot_curves(runs: list[str | Path], out: str | Path,
                evals: list[str | Path] = ()) -> Path:
    """Write the figure of ``runs`` (and the recall bars of ``evals``) to ``out`` (PNG)."""
    logs = [read_log(run) for run in runs]
    reports = [read_eval(path) for path in evals]
    fig, axes = panel_figure(3 + bool(reports), f"{len(logs)} run(s): "
                             + ", ".join(log.name for log in logs))
    _draw_runs(axes[:3], logs)
    if reports:
        _draw_recalls(axes[3], reports)
    return save_png(fig, out)
