"""``cli plot`` on the log.jsonl of real tiny runs and a real ``cli eval`` report, and its one-line
errors (exit 2) for a folder without a log, an empty log, a bad line and a foreign report."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from tests.extract.cli_helpers import run_cli
from tests.viz.world import VizWorld
from viz.curves import read_log, step_positions
from viz.figure import panel_shape, pixel_size


@pytest.fixture(scope="module")
def report(viz_world: VizWorld) -> Path:
    """The ``cli eval`` report of the linear run on the test split."""
    code, output = run_cli("eval", "--checkpoint", viz_world.run("linear") / "best.pt",
                           "--split", "test", "--device", "cpu")
    assert code == 0, output
    return viz_world.run("linear") / "eval-test.json"


def test_the_log_of_a_run_is_read_with_its_epochs_and_steps(viz_world: VizWorld) -> None:
    log = read_log(viz_world.run("laps"))
    lines = [json.loads(line) for line in
             (viz_world.run("laps") / "log.jsonl").read_text().splitlines()]
    assert log.name == "laps" and [r["epoch"] for r in log.epochs] == [0, 1]
    assert len(log.epochs) + len(log.steps) == len(lines) and log.steps
    x, _ = step_positions(log)
    assert len(x) == len(log.steps) and 0 < x.min() and x.max() <= 2    # within epochs 1..2


def test_plot_draws_runs_and_recall_bars(viz_world: VizWorld, report: Path,
                                         tmp_path: Path) -> None:
    out = tmp_path / "curves.png"
    code, output = run_cli("plot", viz_world.run("linear"), viz_world.run("tgdt"), "--out", out,
                           "--eval", report)
    assert code == 0, output
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == pixel_size(*panel_shape(4))
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]      # no temporary file left

    # several reports after one --eval; without reports, three panels
    code, output = run_cli("plot", viz_world.run("linear"), "--out", out, "--eval", report,
                           report)
    assert code == 0, output
    code, output = run_cli("plot", viz_world.run("linear"), "--out", out)
    assert code == 0, output
    with Image.open(out) as img:
        assert img.size == pixel_size(*panel_shape(3))


def test_bad_runs_and_reports_stop_with_one_line(viz_world: VizWorld, report: Path,
                                                 tmp_path: Path) -> None:
    out = tmp_path / "curves.png"
    empty_folder = tmp_path / "not_a_run"
    empty_folder.mkdir()
    code, message = run_cli("plot", empty_folder, "--out", out)
    assert code == 2 and "not_a_run: no log.jsonl" in message

    run = Path(shutil.copytree(viz_world.run("linear"), tmp_path / "run"))
    (run / "log.jsonl").write_text("")
    code, message = run_cli("plot", run, "--out", out)
    assert code == 2 and "log.jsonl: empty log" in message

    lines = (viz_world.run("linear") / "log.jsonl").read_text().splitlines()
    (run / "log.jsonl").write_text(f"{lines[0]}\n{lines[1][:-5]}\n")
    code, message = run_cli("plot", run, "--out", out)
    assert code == 2 and f"{run / 'log.jsonl'}: line 2 is not JSON" in message

    (run / "log.jsonl").write_text('{"loss": 1.0}\n')
    code, message = run_cli("plot", run, "--out", out)
    assert code == 2 and "line 1 is not a training record" in message

    foreign = tmp_path / "other.json"
    foreign.write_text('{"metrics": {"rsum": 1.0}}')
    code, message = run_cli("plot", viz_world.run("linear"), "--out", out, "--eval", foreign)
    assert code == 2 and "other.json: not a cli eval report" in message
    code, message = run_cli("plot", viz_world.run("linear"), "--out", tmp_path / "no" / "x.png")
    assert code == 2 and "does not exist" in message
    assert not out.exists()
