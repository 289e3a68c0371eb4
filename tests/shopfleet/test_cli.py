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
    code = ("import sys; from shopfleet import cli; cli.build_parser('agent', lazy=True); "
            "bad = [m for m in sys.modules if m.startswith(('fleet_controller', 'vision', 'fastapi', 'cv2', 'onnxruntime'))]; "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_unknown_command_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["frobnicate"])
    assert exc.value.code == 2
    assert "invalid choice: 'frobnicate'" in capsys.readouterr().err


def test_top_level_help_imports_no_command_module():
    """``shopfleet --help`` lists every command from the table alone: it works with any extra installed."""
    code = ("import sys; from shopfleet import cli\n"
            "try:\n    cli.main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('edge_agent', 'fleet_controller', 'vision', 'hardware', "
            "'sqlalchemy', 'fastapi', 'cv2', 'psutil', 'serial', 'cryptography') or m == 'shopfleet.demo']\n"
            "print(bad, file=sys.stderr); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for command in cli.COMMANDS:
        assert command in proc.stdout


def test_listed_help_agrees_with_what_the_module_registers():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    registered = {a.dest: a.help for a in sub._choices_actions}
    for name, command in cli.COMMANDS.items():
        assert registered[name].startswith(command.help), name


# A missing extra is simulated by making the import of one of its packages fail, as on a node
# that installed another role's extra (sys.modules[name] = None makes ``import name`` raise
# ModuleNotFoundError). tests/packaging/ checks the same against a real agent-only install.
BLOCK = "import sys; sys.modules[{module!r}] = None; from shopfleet.cli import main; sys.exit(main({argv!r}))"


@pytest.mark.parametrize("module,argv,extra", [
    ("sqlalchemy", ["controller", "--help"], "controller"),
    ("fastapi", ["users", "list"], "controller"),
    ("cv2", ["vision", "--help"], "vision"),
    ("amqtt", ["--log-level", "ERROR", "demo", "--help"], "demo"),
    ("kubernetes_validate", ["manifests", "render", "--shop", "s"], "controller"),
    ("serial", ["hw", "--help"], "agent"),
], ids=["controller", "users", "vision", "demo", "manifests", "hw"])
def test_a_missing_extra_is_named(module, argv, extra):
    proc = subprocess.run([sys.executable, "-c", BLOCK.format(module=module, argv=argv)], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    cmd = cli._command_of(argv)
    assert proc.stderr.strip() == (f"shopfleet {cmd}: needs the '{extra}' extra: pip install 'shopfleet[{extra}]' "
                                   f"(not installed: {module})")
    assert "Traceback" not in proc.stderr


def test_a_module_missing_at_run_time_names_the_extra_that_brings_it():
    """The agent imports the Kubernetes client only when its config applies to a cluster: that is the applier extra."""
    code = ("import sys; from shopfleet import cli\n"
            "cli.COMMANDS['agent'] = cli.Command('agent', 'x', 'tests.support.fake_command', 'agent')\n"
            "sys.modules['kubernetes'] = None\n"
            "sys.exit(cli.main(['agent']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip() == ("shopfleet agent: needs the 'applier' extra: pip install 'shopfleet[applier]' "
                                   "(not installed: kubernetes)")


def test_extra_table_matches_pyproject():
    """Every extra of pyproject.toml that cli.EXTRA_MODULES describes lists the distributions of those modules."""
    import re
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]
    dist_of = {"serial": "pyserial", "cv2": "opencv-python-headless", "argon2": "argon2-cffi",
               "kubernetes_validate": "kubernetes-validate", "sqlalchemy": "sqlalchemy"}
    for extra, modules in cli.EXTRA_MODULES.items():
        reqs = project["optional-dependencies"][extra]
        names = {re.split(r"[\[<>=~!; ]", r, maxsplit=1)[0].lower() for r in reqs}
        assert {dist_of.get(m, m).lower() for m in modules} <= names, extra
        included = {e for r in reqs if r.startswith("shopfleet[") for e in r[len("shopfleet["):-1].split(",")}
        assert included == set(cli.EXTRA_INCLUDES.get(extra, ())), extra


def test_a_missing_first_party_module_is_a_bug_not_an_extra():
    exc = ModuleNotFoundError("No module named 'edge_agent.nope'", name="edge_agent.nope")
    assert cli.missing_extra("agent", exc) is None
    other = cli.missing_extra("agent", ModuleNotFoundError("x", name="kubernetes.client"))
    assert other is not None and other.extra == "applier" and other.reason == "missing_extra"
