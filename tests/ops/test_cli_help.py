"""`sluice --help`: every command listed with a one-line summary, job commands first."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import typer.main

from ops.cli import app

pytestmark = pytest.mark.unit


# Typer builds its commands on its own copy of click: groups are told by their subcommands.
def _commands(group: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = []
    for name, command in group.commands.items():
        found.append((*path, name))
        if hasattr(command, "commands"):
            found += _commands(command, (*path, name))
    return found


def _command(path: tuple[str, ...]) -> Any:
    command = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]  # type: ignore[attr-defined]
    return command


def test_every_command_has_a_summary_on_one_line() -> None:
    # The help list shows a command's first paragraph with its line breaks kept: a summary
    # wrapped in the docstring comes out broken mid-sentence.
    root = typer.main.get_command(app)
    broken = {" ".join(path): summary for path in _commands(root)
              if "\n" in (summary := inspect.cleandoc(_command(path).help or "").split("\n\n")[0])}
    missing = [" ".join(path) for path in _commands(root) if not (_command(path).help or "").strip()]

    assert not broken, broken
    assert not missing


def test_the_job_commands_come_first() -> None:
    root = typer.main.get_command(app)
    names = list(root.commands)

    last_jobs = max(names.index(n) for n in names if n not in ("eval", "versions")
                    and not hasattr(root.commands[n], "commands"))  # groups come last anyway
    assert last_jobs < names.index("eval") < names.index("versions")
