"""`--help` of every command at 80 columns: plain text, every option name whole, the model-spec forms listed."""

from __future__ import annotations

import re

import pytest
import typer
from typer.testing import CliRunner

from atomuq.cli.common import model_help
from atomuq.cli.main import app

runner = CliRunner()


def commands(group, path: tuple[str, ...] = ()) -> list:
    """(command path, command) of every leaf command under group (typer's own click groups have .commands)."""
    if getattr(group, "commands", None):
        return [leaf for name, sub in group.commands.items() for leaf in commands(sub, (*path, name))]
    return [(path, group)]


ALL = commands(typer.main.get_command(app))
MODEL_COMMANDS = [path for path, cmd in ALL if any("--model" in p.opts for p in cmd.params)]


def help_text(path: tuple[str, ...]) -> str:
    result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "80", "TERMINAL_WIDTH": "80"})
    assert result.exit_code == 0, result.output
    return result.output


def test_every_command_is_covered():
    names = {" ".join(path) for path, _ in ALL}
    assert {"score", "attack", "bench", "md", "drift", "label", "sample", "train", "improve", "ltau fit",
            "ltau score", "ltau calibrate", "ltau weights", "models"} <= names


@pytest.mark.parametrize("path, command", ALL, ids=[" ".join(p) for p, _ in ALL])
def test_help_at_80_columns_shows_every_option_name_whole(path, command):
    text = help_text(path)
    assert all(len(line) <= 80 for line in text.splitlines()), max(text.splitlines(), key=len)
    assert "…" not in text and "╭" not in text  # nothing cut, no rich panels
    assert "\\[" not in text  # plain help: text escaped for rich markup would show its backslashes
    for param in command.params:
        for opt in (*param.opts, *param.secondary_opts):
            if opt.startswith("-"):
                assert re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", text), f"{opt} missing from {' '.join(path)} --help"


@pytest.mark.parametrize("path", MODEL_COMMANDS, ids=[" ".join(p) for p in MODEL_COMMANDS])
def test_model_help_lists_every_spec_form(path):
    text = " ".join(help_text(path).split())  # undo the wrapping
    section = text.split("--model", 1)[1]
    for form in ("orb:PATH", "metatomic:PATH", "ase:MODULE:CLASS"):
        assert form in section, form
    assert "bundled" in section and ".pt" in section


def test_spec_forms_come_from_the_resolver():
    forms = model_help()
    for prefix in ("orb:", "metatomic:", "ase:"):
        assert prefix in forms


def test_ltau_weights_help_names_the_training_key():
    text = " ".join(help_text(("ltau", "weights")).split())
    assert "data.atom_weights" in text and "loss.atom_weights" not in text

