"""The ``shopfleet`` command root: every command registered, help for each, lazy imports."""

from __future__ import annotations

import subprocess
import sys

import pytest

from shopfleet import cli


def test_command_table_matches_what_the_modules_register():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert list(sub.choices) == list(cli.COMMANDS)  # every command listed, in help order, none unlisted


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: shopfleet") and command in out and len(out) > 200


@pytest.mark.parametrize("argv,expected", [
    (["agent", "--config", "x"], "agent"),
    (["--log-level", "DEBUG", "hw", "read"], "hw"),
    (["--help"], None),
    ([], None),
], ids=["plain", "after-global-option", "help", "empty"])
def test_command_word(argv, expected):
    assert cli._command_of(argv) == expected


def test_agent_command_does_not_import_the_controller():
    code = ("import sys; from shopfleet import cli; cli.build_parser('agent'); "
            "bad = [m for m in sys.modules if m.startswith(('fleet_controller', 'vision', 'fastapi', 'cv2', 'onnxruntime'))]; "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_unknown_command_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["frobnicate"])
    assert exc.value.code == 2
    assert "invalid choice: 'frobnicate'" in capsys.readouterr().err
