"""The click group of ``cli.py``: every ``--option`` that the code's messages and help texts name
is an option of the commands. A message that says ``cli eval: --photos DIR`` must name an option of
``cli eval``; one that names no command must name an option of some command."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import click

from cli import cli

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("extract", "cache", "heads", "search", "viz")
# An option, or a command named as ``cli NAME`` / ``cli.py NAME`` (its options follow it up to the
# end of the clause: a closing parenthesis, a semicolon or the end of a sentence).
TOKEN = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)|(?<![\w./-])cli(?:\.py)? ([a-z][a-z-]*)"
                   r"|(\)|;|\.(?:\s|$))")
# Options of other programs that messages quote, each with the program.
FOREIGN = {"--no-deps": "pip install", "--nproc-per-node": "torchrun"}


def option_names(command: click.Command) -> set[str]:
    """Every spelling of every option of ``command``, ``--help`` included."""
    return {name for param in command.params if isinstance(param, click.Option)
            for name in (*param.opts, *param.secondary_opts)} | {"--help"}


EVERY_OPTION = set().union(*(option_names(command) for command in cli.commands.values()))


def unknown_options(text: str) -> list[str]:
    """The options ``text`` names that the command it names (else every command) does not have,
    as ``--option`` or ``cli NAME --option``."""
    allowed, scope, unknown = EVERY_OPTION, "", []
    for option, command, end in TOKEN.findall(text):
        if end:
            allowed, scope = EVERY_OPTION, ""
        elif command:
            known = cli.commands.get(command)
            allowed, scope = ((option_names(known), f"cli {command} ") if known
                              else (EVERY_OPTION, ""))
        elif option not in allowed and option not in FOREIGN:
            unknown.append(scope + option)
    return unknown


def code_strings(path: Path) -> list[tuple[int, str]]:
    """The string literals of a module, f-string parts included, docstrings excluded."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                       ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)}
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and id(node) not in docstrings]


def source_files() -> list[Path]:
    return [ROOT / "cli.py"] + sorted(path for package in PACKAGES
                                      for path in (ROOT / package).rglob("*.py"))


def test_every_option_a_message_names_exists() -> None:
    problems = [f"{path.relative_to(ROOT)}:{line}: {option}"
                for path in source_files() for line, text in code_strings(path)
                for option in unknown_options(text)]
    assert not problems, "messages name options no command has:\n" + "\n".join(problems)


def test_the_check_catches_an_option_of_another_command_and_a_made_up_one() -> None:
    assert unknown_options("set data.images_root (cli eval: --images DIR)") == [
        "cli eval --images"]
    assert unknown_options("cli search --rerank K --fine RUN/best.pt") == [
        "cli search --rerank", "cli search --fine"]
    assert unknown_options("give --no-such-option") == ["--no-such-option"]
    assert unknown_options("a cli eval report (eval.json); repeatable (--eval a.json)") == []
    assert unknown_options("cli extract --images DIR; cli eval --photos DIR") == []


def test_eval_names_caches_and_photo_folders_apart() -> None:
    """``--images`` is a photo folder wherever it exists; ``cli eval`` takes cache files as
    ``--image-cache`` / ``--text-cache``."""
    evaluate, extract = option_names(cli.commands["eval"]), option_names(cli.commands["extract"])
    assert {"--image-cache", "--text-cache", "--photos"} <= evaluate and "--images" not in evaluate
    assert "--images" in extract
