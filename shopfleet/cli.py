"""The ``shopfleet`` command: one entry point, a subcommand per part of the system.

Each package owns its subcommands in a module with ``register(subparsers)``; this module only
lists them (name, one-line help, module, extra), so a part's options and help live next to its
code. A handler returns the process exit code.

Only the module of the command being run is imported; ``shopfleet --help`` imports none of them
and lists the commands from :data:`COMMANDS`. Each role installs its own extra (README.md,
"Install per role"): a Raspberry Pi running ``shopfleet agent`` has neither the controller's web
stack nor OpenCV, so a command whose extra is missing must say which extra to install instead of
failing with a ``ModuleNotFoundError`` traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys
from dataclasses import dataclass

from shopfleet.errors import PermanentError

FIRST_PARTY = frozenset({"shopfleet", "edge_agent", "vision", "hardware", "fleet_controller", "fusion"})


@dataclass(frozen=True)
class Command:
    """One ``shopfleet`` command: what ``--help`` says, which module registers it, which extra it needs."""

    name: str
    help: str
    module: str
    extra: str


# In the order ``shopfleet --help`` lists them. The help text repeats what each module's
# ``register`` says; tests/shopfleet/test_cli.py checks that the two agree.
_TABLE = (
    Command("demo", "run a broker, the controller and simulated shops on this machine", "shopfleet.demo", "demo"),
    Command("agent", "run the node agent (heartbeats, durable outbox, pipelines, commands, desired state)",
            "edge_agent.cli", "agent"),
    Command("controller", "run the central fleet controller (MQTT intake, registry, REST API)",
            "fleet_controller.cli", "controller"),
    Command("broker-config", "write the Mosquitto config, passwords and ACL for the fleet (and each shop's broker)",
            "fleet_controller.cli", "controller"),
    Command("pki", "the fleet's certificate authority: init, issue (and rotate), revoke, list",
            "fleet_controller.broker_cli", "controller"),
    Command("broker-denials", "count the publishes and connections Mosquitto refuses, by identity, from its log (Prometheus, alerts)",
            "fleet_controller.broker_cli", "agent"),
    Command("release", "create and list releases (images pinned by digest); make the signing key",
            "fleet_controller.rollout.cli", "controller"),
    Command("rollout", "start, watch, pause, resume, abort and roll back rollouts",
            "fleet_controller.rollout.cli", "controller"),
    Command("manifests", "validate and render the Kubernetes manifests", "fleet_controller.rollout.cli", "controller"),
    Command("model-stage", "copy a model package from the shop's applier onto this node and verify it (vision pods' init container)",
            "edge_agent.apply.model_fetch", "agent"),
    Command("hw", "sensor boards over serial: simulate, read, calibrate", "hardware.cli", "agent"),
    Command("users", "manage dashboard and API users", "fleet_controller.web.accounts.cli", "controller"),
    Command("tokens", "manage API tokens for the CLI and automation", "fleet_controller.web.accounts.cli", "controller"),
    Command("enroll-token", "one-time enrollment tokens for new nodes: create, list, revoke",
            "fleet_controller.enrollment_cli", "controller"),
    Command("vision", "camera pipeline: models, running a camera, tracker evaluation", "vision.cli", "vision"),
    Command("fusion", "carts from tracks and shelf weights: evaluate on scenarios", "fusion.cli", "vision"),
)
COMMANDS: dict[str, Command] = {c.name: c for c in _TABLE}
COMMAND_MODULES = tuple(dict.fromkeys(c.module for c in _TABLE))
"""Every module that registers commands."""

EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    "agent": ("psutil", "serial", "cryptography"),
    "applier": ("kubernetes",),
    "vision": ("numpy", "scipy", "cv2", "onnxruntime", "onnx", "platformdirs", "motmetrics"),
    "controller": ("sqlalchemy", "alembic", "psycopg", "fastapi", "uvicorn", "httpx", "jinja2", "argon2",
                   "cryptography", "kubernetes_validate", "jsonschema", "referencing"),
    "demo": ("amqtt",),
}
"""The top-level modules each extra of pyproject.toml brings, by import name, beyond the core
dependencies and the extras it includes (:data:`EXTRA_INCLUDES`). A command runs only when every
module of its extra is found, so a partial install fails at once with the extra to install, not
halfway through a run; tests/shopfleet/test_cli.py checks this table against pyproject.toml."""

EXTRA_INCLUDES: dict[str, tuple[str, ...]] = {"applier": ("agent",), "vision": ("agent",), "demo": ("controller", "vision")}


def modules_of(extra: str) -> tuple[str, ...]:
    """Return every module ``extra`` brings, its included extras' modules first."""
    out: dict[str, None] = {}
    for inner in EXTRA_INCLUDES.get(extra, ()):
        out.update(dict.fromkeys(modules_of(inner)))
    out.update(dict.fromkeys(EXTRA_MODULES[extra]))
    return tuple(out)


def extra_of_module(module: str, command: str) -> str:
    """Return the extra that brings ``module``: the command's own extra if it does, else the first that does.

    So a module missing at run time (an agent applying to a cluster without the Kubernetes client)
    names the extra to add; a module no extra lists falls back to the command's extra.
    """
    own = COMMANDS[command].extra
    if module in modules_of(own):
        return own
    return next((extra for extra, mods in EXTRA_MODULES.items() if module in mods), own)


def _not_installed(modules: tuple[str, ...]) -> list[str]:
    """Return the modules of ``modules`` that cannot be found (searched for, not imported)."""
    return [m for m in modules if importlib.util.find_spec(m) is None]


class MissingExtra(PermanentError):
    """A command needs a package of an extra that is not installed."""

    default_reason = "missing_extra"

    def __init__(self, command: str, extra: str, modules: list[str]) -> None:
        super().__init__(
            f"shopfleet {command}: needs the {extra!r} extra: pip install 'shopfleet[{extra}]' "
            f"(not installed: {', '.join(modules)})"
        )
        self.command, self.extra, self.modules = command, extra, modules


def missing_extra(command: str, exc: ModuleNotFoundError) -> MissingExtra | None:
    """Return the :class:`MissingExtra` ``exc`` stands for, or None when it is a missing first-party module (a bug)."""
    top = (exc.name or "").split(".")[0]
    if not top or top in FIRST_PARTY:
        return None
    return MissingExtra(command, extra_of_module(top, command), [top])


def _command_of(argv: list[str]) -> str | None:
    """Return the command word of ``argv`` (the first non-option word), if any."""
    skip = False
    for word in argv:
        if skip:
            skip = False
        elif word == "--log-level":
            skip = True
        elif not word.startswith("-"):
            return word
    return None


def build_parser(command: str | None = None, *, lazy: bool = False) -> argparse.ArgumentParser:
    """Return the top-level parser.

    ``command`` is registered by its module (importing it). The other commands are registered by
    their modules too, unless ``lazy``: then they are listed by name and help alone, which is all
    ``shopfleet --help`` and argparse's "invalid choice" need, and nothing else is imported.
    Raises :class:`MissingExtra` when ``command``'s module needs a package that is not installed.
    """
    parser = argparse.ArgumentParser(
        prog="shopfleet",
        description=(
            "Run a fleet of cashierless shops: the node agent on every shop computer, the vision "
            "and sensor pipelines it supervises, and the central fleet controller with its "
            "dashboard, releases and staged rollouts."
        ),
        epilog=(
            "Run 'shopfleet COMMAND --help' for the options of a command. Each role installs its own "
            "extra: pip install 'shopfleet[agent]' (or applier, vision, controller, demo). Docs: README.md and docs/."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="how much to log to stderr (default: %(default)s)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = COMMANDS.get(command) if command is not None else None
    registered: set[str] = set()
    for cmd in COMMANDS.values():
        if cmd.module in registered:
            continue
        if lazy and (chosen is None or cmd.module != chosen.module):
            # Listed only: its module (and what it imports) is loaded when the command is run.
            sub.add_parser(cmd.name, help=cmd.help, add_help=False)
            continue
        if chosen is not None and cmd.module == chosen.module:
            absent = _not_installed(modules_of(chosen.extra))
            if absent:
                raise MissingExtra(chosen.name, chosen.extra, absent)
        try:
            module = importlib.import_module(cmd.module)
        except ModuleNotFoundError as exc:
            missing = missing_extra(cmd.name if chosen is None else chosen.name, exc)
            if missing is None:
                raise
            raise missing from exc
        module.register(sub)
        registered.add(cmd.module)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, set up logging and run the chosen subcommand."""
    argv = sys.argv[1:] if argv is None else argv
    command = _command_of(argv)
    try:
        parser = build_parser(command, lazy=True)
    except MissingExtra as exc:
        print(exc, file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except ModuleNotFoundError as exc:
        # A package the command imports only when it needs it (motmetrics, the Kubernetes client).
        missing = missing_extra(args.command, exc)
        if missing is None:
            raise
        print(missing, file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
