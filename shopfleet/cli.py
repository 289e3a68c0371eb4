"""The ``shopfleet`` command: one entry point, a subcommand per part of the system.

Each package owns its subcommands in a module with ``register(subparsers)``; this module only
lists them, so a part's options and help live next to its code. A handler returns the process
exit code.

Only the module of the command being run is imported (all of them for ``--help`` or a typo):
``shopfleet agent`` runs on Raspberry Pis beside the vision pipeline, and importing the
controller's web stack there would cost it tens of megabytes for nothing.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Which module registers each command, in the order ``shopfleet --help`` lists them.
COMMANDS: dict[str, str] = {
    "demo": "shopfleet.demo",
    "agent": "edge_agent.cli",
    "controller": "fleet_controller.cli",
    "broker-config": "fleet_controller.cli",
    "release": "fleet_controller.rollout.cli",
    "rollout": "fleet_controller.rollout.cli",
    "manifests": "fleet_controller.rollout.cli",
    "hw": "hardware.cli",
    "users": "fleet_controller.accounts.cli",
    "tokens": "fleet_controller.accounts.cli",
    "vision": "vision.cli",
    "fusion": "fusion.cli",
}
COMMAND_MODULES = tuple(dict.fromkeys(COMMANDS.values()))
"""Every module that registers commands (all of them are imported for ``--help``)."""


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


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Return the top-level parser with ``command`` registered, or every subcommand when None or unknown."""
    parser = argparse.ArgumentParser(
        prog="shopfleet",
        description=(
            "Run a fleet of cashierless shops: the node agent on every shop computer, the vision "
            "and sensor pipelines it supervises, and the central fleet controller with its "
            "dashboard, releases and staged rollouts."
        ),
        epilog="Run 'shopfleet COMMAND --help' for the options of a command. Docs: README.md and docs/.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="how much to log to stderr (default: %(default)s)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    modules = [COMMANDS[command]] if command in COMMANDS else COMMAND_MODULES
    for name in modules:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, set up logging and run the chosen subcommand."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(_command_of(argv))
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
