"""README.md and the pages of docs/ as a contract: every ``cli`` invocation they show parses, every
repository path and relative link they name exists, README's Layout lists every module, and the
per-row commands of docs/results.md are the ones ``scripts/reproduce.py`` runs. Nothing is
executed."""
from __future__ import annotations

import importlib.util
import re
import shlex
import sys
from pathlib import Path
from types import ModuleType

import click
import pytest

from cli import cli
from heads.registry import list_heads
from train.commands import resolve_train_config

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
PAGES = {path.relative_to(ROOT).as_posix(): path.read_text(encoding="utf-8")
         for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]}
RESULTS = PAGES["docs/results.md"]
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
# Repository paths: a top-level folder of the repo, or a root file; not a part of a longer path
# (runs/..., features/..., ../shared/..., demo/... never match).
REPO_PATH = re.compile(r"(?<![\w./$~-])((?:configs|heads|bench|scripts|extract|cache|search|viz|"
                       r"docs|tests)/[\w./<>{},*-]*|requirements[\w-]*\.txt|Makefile|setup\.cfg|"
                       r"pyproject\.toml|cli\.py)")
CONFIG_NAME = re.compile(r"(?<![\w./-])((?:f8k|f30k|coco|demo)_[\w<>{},-]*\.yaml)")
LINK = re.compile(r"\]\(([^()\s]+)\)")


def _load_reproduce() -> ModuleType:
    """``scripts/reproduce.py`` as a module (scripts/ is no package)."""
    spec = importlib.util.spec_from_file_location("reproduce", ROOT / "scripts" / "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


reproduce = _load_reproduce()


def sections(text: str) -> dict[str, str]:
    """``## Title`` -> that section's text (up to the next ``## ``)."""
    parts = re.split(r"^## ", text, flags=re.MULTILINE)
    return {part.split("\n", 1)[0]: part for part in parts[1:]}


def without_layout(text: str) -> str:
    """The README minus its ``## Layout`` section (checked on its own)."""
    return text.replace(sections(text).get("Layout", ""), "")


def generated(text: str) -> str:
    """The part of docs/results.md that ``scripts/reproduce.py --markdown`` writes."""
    start = text.index(reproduce.BEGIN)
    return text[start:text.index(reproduce.END) + len(reproduce.END)]


def code_lines(text: str) -> list[str]:
    """The lines of the fenced code blocks, backslash continuations joined."""
    lines: list[str] = []
    for block in FENCE.findall(text):
        lines += [line.strip() for line in re.sub(r"\\\n\s*", " ", block).splitlines()]
    return [line for line in lines if line]


def inline_code(text: str) -> list[str]:
    """The inline code spans outside the fenced blocks."""
    return re.findall(r"`([^`]+)`", FENCE.sub("", text))


def cli_args(line: str) -> list[str]:
    """The arguments after ``cli`` / ``cli.py`` of a command line ([] if it runs no subcommand)."""
    try:
        words = shlex.split(line.replace("\\|", "|"), comments=True)
    except ValueError:
        return []
    if words[:1] == ["cli"]:
        return words[1:]
    if words and (words[0].endswith("python") or words[0] == "torchrun") and "cli.py" in words:
        return words[words.index("cli.py") + 1:]
    return []


def option_names(command: click.Command) -> set[str]:
    """Every option spelling of a click command, help included."""
    return {name for param in command.params if isinstance(param, click.Option)
            for name in (*param.opts, *param.secondary_opts)} | {"--help", "-h"}


def invocation_problems(line: str, parse: bool) -> list[str]:
    """What is wrong with the ``cli`` invocation in ``line``: an unknown subcommand or option, or
    (``parse``: a whole command, not a fragment) arguments click rejects."""
    args = cli_args(line)
    if not args:
        return []
    command = cli.commands.get(args[0])
    if command is None:
        return [f"{line!r}: no command {args[0]!r}"]
    unknown = [word for word in args[1:] if word.startswith("--")
               and word.split("=", 1)[0] not in option_names(command)]
    if unknown:
        return [f"{line!r}: {args[0]} has no option {', '.join(unknown)}"]
    if parse:
        try:
            command.make_context(args[0], args[1:])
        except click.ClickException as exc:
            return [f"{line!r}: {exc.format_message()}"]
    return []


def readme_invocation_problems(text: str) -> list[str]:
    """Problems of every invocation in the code blocks (whole commands) and inline code."""
    return ([p for line in code_lines(text) for p in invocation_problems(line, parse=True)]
            + [p for span in inline_code(text) for p in invocation_problems(span, parse=False)])


def expand(pattern: str) -> list[str]:
    """``a{b,c}d`` -> ``abd``, ``acd`` (every brace group); ``<name>`` -> ``*``."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [re.sub(r"<[^<>]*>", "*", pattern)]
    return [path for alternative in match.group(1).split(",")
            for path in expand(pattern[:match.start()] + alternative + pattern[match.end():])]


def missing_paths(text: str) -> list[str]:
    """Repository paths (and config file names) in ``text`` that match nothing in the repo."""
    named = [p.rstrip(".,;:") for p in REPO_PATH.findall(text)]
    named += [f"configs/{name}" for name in CONFIG_NAME.findall(text)]
    missing = []
    for path in sorted(set(named)):
        for candidate in expand(path):
            found = (any(ROOT.glob(candidate)) if "*" in candidate
                     else (ROOT / candidate).exists())
            if not found:
                missing.append(path if candidate == path else f"{path} ({candidate})")
    return missing


def closure(name: str) -> set[str]:
    """The rows row ``name`` needs, directly or through other rows."""
    needed: set[str] = set()
    stack = list(reproduce.ROWS[name].needs)
    while stack:
        current = stack.pop()
        if current not in needed:
            needed.add(current)
            stack += reproduce.ROWS[current].needs
    return needed


def train_args(command: str) -> list[str] | None:
    """The ``train-head`` arguments of a registry command (None for other commands)."""
    words = shlex.split(command)
    return words[3:] if words[:3] == ["python", "cli.py", "train-head"] else None


TRAINING_ROWS = [row for row in reproduce.ROWS.values()
                 if any(train_args(c) is not None for c in row.commands)]


# ------------------------------------------------------------------------------ commands


@pytest.mark.parametrize("page", PAGES)
def test_every_cli_invocation_parses(page: str) -> None:
    problems = readme_invocation_problems(PAGES[page])
    assert not problems, f"{page}: invocations that cli.py rejects:\n" + "\n".join(problems)


def test_the_option_table_names_options_of_cli_extract() -> None:
    table = PAGES["docs/cache.md"]
    table = table[table.index("| option | meaning |"):table.index("Default encoders")]
    options = set(re.findall(r"(?<![\w-])--[a-z][\w-]*", table))
    unknown = sorted(options - option_names(cli.commands["extract"]))
    assert options and not unknown, f"docs/cache.md's cli extract table: no such options {unknown}"


def test_the_checks_catch_a_bad_option_a_bad_command_and_a_missing_path() -> None:
    broken = ("```bash\npython cli.py eval --checkpoint x.pt --no-such-option 3\n"
              "python cli.py train-head --config c.yaml\n```\n"
              "`cli evaluate --split dev` and `cli extract --skip-existing ...`, see "
              "`configs/f8k_nothing.yaml`, `heads/nothing.py` and `configs/{f8k,zz}_<head>.yaml`")
    problems = readme_invocation_problems(broken)
    assert [p.split(": ", 1)[1] for p in problems] == [
        "eval has no option --no-such-option", "Missing option '--out'.",
        "no command 'evaluate'"]
    assert missing_paths(broken) == [
        "configs/f8k_nothing.yaml", "configs/{f8k,zz}_<head>.yaml (configs/zz_*.yaml)",
        "heads/nothing.py"]


# ------------------------------------------------------------------------------ paths


@pytest.mark.parametrize("page", PAGES)
def test_every_repository_path_exists(page: str) -> None:
    missing = missing_paths(without_layout(PAGES[page]))
    assert not missing, f"{page} names paths that are not in the repository: {missing}"


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def broken_links(page: str, text: str) -> list[str]:
    """Relative links of ``text`` (the page ``page``) to a missing file or heading."""
    def anchors(markdown: str) -> set[str]:
        return {anchor(h) for h in re.findall(r"^#+ (.+)$", FENCE.sub("", markdown), re.MULTILINE)}

    broken = []
    for target in LINK.findall(FENCE.sub("", text)):
        if re.match(r"[a-z]+:", target):
            continue                                   # http(s):, mailto:
        file, _, fragment = target.partition("#")
        path = (ROOT / page).parent / file
        if file and not path.exists():
            broken.append(target)
        elif fragment and fragment not in anchors(path.read_text() if file else text):
            broken.append(target)
    return broken


@pytest.mark.parametrize("page", PAGES)
def test_every_relative_link_resolves(page: str) -> None:
    broken = broken_links(page, PAGES[page])
    assert not broken, f"{page} links to missing files or headings: {broken}"


def test_the_link_check_catches_a_missing_page_and_heading() -> None:
    text = ("[a](docs/results.md#commands-of-every-row) [b](docs/nothing.md) "
            "[c](docs/results.md#no-such-heading) [d](https://example.org/x.md) [e](#a-heading) "
            "[f](#nowhere)\n\n## A heading\n")
    assert broken_links("README.md", text) == ["docs/nothing.md",
                                               "docs/results.md#no-such-heading", "#nowhere"]


def layout_entries(section: str) -> dict[str, str]:
    """The tree of the Layout section's code block: ``{repo path: its description}``. A name at
    column 0 is a top-level entry, a name indented by two spaces is inside the last top-level
    folder, and a deeper line continues the description above it."""
    entries: dict[str, str] = {}
    top = last = ""
    for line in FENCE.search(section).group(1).splitlines():
        indent = len(line) - len(line.lstrip())
        if indent > 2:
            entries[last] += " " + line.strip()
            continue
        name, _, description = line.strip().partition(" ")
        last = name if indent == 0 else top + name
        top = name if indent == 0 else top
        entries[last] = description.strip()
    return entries


def test_every_entry_of_the_layout_exists() -> None:
    missing = [path for path in layout_entries(sections(README)["Layout"])
               if not (ROOT / path).exists()]
    assert not missing, f"README's ## Layout names paths that do not exist: {missing}"


def test_the_layout_lists_every_module() -> None:
    """Each module is an entry of its own or named in the description of its folder's entry."""
    entries = layout_entries(sections(README)["Layout"])
    unlisted = []
    for folder in ("cache", "backbones", "extract", "heads", "train", "search", "viz", "bench",
                   "scripts"):
        for file in sorted((ROOT / folder).rglob("*")):
            if file.suffix not in (".py", ".sh") or file.name == "__init__.py":
                continue
            path = file.relative_to(ROOT).as_posix()
            parent = path.rsplit("/", 1)[0] + "/"
            if path not in entries and not re.search(rf"\b{re.escape(file.stem)}\b",
                                                     entries.get(parent, "")):
                unlisted.append(path)
    assert not unlisted, f"README's ## Layout does not list: {unlisted}"


# ------------------------------------------------------------------------------ rows


def test_generated_section_is_what_reproduce_renders() -> None:
    assert generated(RESULTS) + "\n" == reproduce.render_markdown()
    assert reproduce.render_results(RESULTS) == RESULTS, (
        "docs/results.md's commands of every row differ from scripts/reproduce.py: run "
        "`python scripts/reproduce.py --markdown`")


def test_markdown_rewrites_only_the_generated_section(tmp_path: Path) -> None:
    page = tmp_path / "results.md"
    stale = RESULTS.replace(generated(RESULTS), f"{reproduce.BEGIN}\nold\n{reproduce.END}")
    page.write_text(stale)
    assert reproduce.write_results(page) and page.read_text() == RESULTS
    assert not reproduce.write_results(page)
    page.write_text("# Results\n\nno generated section\n")
    with pytest.raises(ValueError, match="no generated section"):
        reproduce.write_results(page)


def test_every_table_row_is_a_registry_row_and_every_row_is_named() -> None:
    results = sections(RESULTS)["Results on Flickr8k (1K test)"]
    tables = results.replace(generated(RESULTS), "")
    in_tables = re.findall(r"^\| `([\w-]+)` \|", tables, re.MULTILINE)
    assert set(in_tables) - set(reproduce.ROWS) == set()
    outside = RESULTS.replace(generated(RESULTS), "")
    unnamed = [name for name in reproduce.ROWS if f"`{name}`" not in outside]
    assert not unnamed, f"rows of scripts/reproduce.py that docs/results.md never names: {unnamed}"


def table_rows(text: str) -> dict[str, list[str]]:
    """``{row name: its cells}`` of the markdown table lines of ``text`` that name a row in a cell
    of their own (bold marks dropped)."""
    rows: dict[str, list[str]] = {}
    for line in re.findall(r"^\|.*\|$", text, re.MULTILINE):
        cells = [cell.strip().strip("*") for cell in line.strip("|").split("|")]
        names = [cell[1:-1] for cell in cells if re.fullmatch(r"`[\w-]+`", cell)
                 and cell[1:-1] in reproduce.ROWS]
        if names:
            rows.setdefault(names[-1], cells)
    return rows


def test_the_readme_results_are_the_full_tables_numbers() -> None:
    """Each row of README's results table shows the recalls and rsum of that row in
    docs/results.md."""
    full = table_rows(sections(RESULTS)["Results on Flickr8k (1K test)"].replace(
        generated(RESULTS), ""))
    shown = table_rows(sections(README)["Results on Flickr8k (1K test)"])
    assert {cells[0].strip("`") for cells in shown.values()} == set(list_heads())
    for name, cells in shown.items():
        assert cells[-3:] == full[name][3:6], name


def test_walkthrough_commands_are_row_commands() -> None:
    walk = sections(README)["Flickr8k in three commands"]
    commands = {" ".join(shlex.split(c)) for row in reproduce.ROWS.values() for c in row.commands}
    shown = [line.replace("$D", reproduce.DATA) for line in code_lines(walk)
             if cli_args(line)[:1] in (["extract"], ["train-head"], ["eval"])]
    assert len(shown) == 3
    for line in shown:
        assert " ".join(shlex.split(line, comments=True)) in commands, line


def test_benchmark_row_command_is_the_benchmark_tables() -> None:
    (command,) = reproduce.ROWS["bench-rerank-f8k"].commands
    assert f"`{command}`" in sections(RESULTS)["Benchmarks"]


def test_training_rows_have_their_own_run_folders() -> None:
    outs = [args[args.index("--out") + 1] for row in TRAINING_ROWS for c in row.commands
            if (args := train_args(c)) is not None]
    assert outs == [reproduce.run_dir(row.name) for row in TRAINING_ROWS]
    assert len(set(outs)) == len(outs)


@pytest.mark.parametrize("row", TRAINING_ROWS, ids=lambda row: row.name)
def test_training_row_resolves_to_a_config_on_caches_it_needs(
        row: reproduce.Row, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    (command,) = [c for c in row.commands if train_args(c) is not None]
    params = cli.commands["train-head"].make_context("train-head", train_args(command)).params
    config = resolve_train_config(params["config_path"], params["overrides"], params["head"],
                                  Path(params["out"]), params["resume"], params["features"],
                                  params["dataset"])
    assert config["run"]["threads"] in (1, 2)      # rows name their threads (e2e rows: two)
    produced = {Path(out).name for need in closure(row.name)
                for out in reproduce.ROWS[need].outputs}
    for modality in ("image", "text"):
        assert f"{modality}-{config['data'][modality]}.h5" in produced
    teacher = config["head"].get("teacher_checkpoint")
    if teacher:
        assert teacher in {f"{reproduce.run_dir(n)}/best.pt" for n in closure(row.name)}


@pytest.mark.parametrize("row", reproduce.ROWS.values(), ids=lambda row: row.name)
def test_every_run_a_row_reads_is_its_own_or_a_needed_rows(row: reproduce.Row) -> None:
    folder = reproduce.run_dir(row.name)
    writes_own = row in TRAINING_ROWS or any(o.startswith(f"{folder}/") for o in row.outputs)
    own = {folder} if writes_own else set()
    allowed = own | {reproduce.run_dir(name) for name in closure(row.name)}
    used = {run for command in row.commands for run in re.findall(r"runs/[\w-]+", command)}
    assert used <= allowed, f"{row.name} reads {sorted(used - allowed)} without needing its row"


def test_plan_runs_needed_rows_first_and_skips_finished_ones(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(reproduce, "ROOT", tmp_path)
    assert [(row.name, runs) for row, runs in reproduce.plan("laps")] == [
        ("cache-effnet-minilm", True), ("linear", True), ("laps", True)]
    for path in ("runs/f8k_linear/best.pt", *reproduce.ROWS["cache-effnet-minilm"].outputs):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).touch()
    assert [(row.name, runs) for row, runs in reproduce.plan("laps")] == [
        ("cache-effnet-minilm", False), ("linear", False), ("laps", True)]
    assert reproduce.run("laps", dry_run=True) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[1] == "# linear: skipped, its outputs exist (runs/f8k_linear/best.pt, ...)"
    assert printed[3:] == list(reproduce.ROWS["laps"].commands)


def test_run_stops_at_the_first_failure_with_its_exit_status(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "ran"
    row = reproduce.Row("fails", "a failing command", (
        'python -c "import sys; sys.exit(3)"', f'python -c "open({str(marker)!r}, \'w\')"'))
    monkeypatch.setitem(reproduce.ROWS, "fails", row)
    assert reproduce.run("fails", dry_run=False) == 3
    assert not marker.exists()
