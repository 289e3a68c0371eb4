"""The ``shopfleet`` command: one entry point, a subcommand per part of the system.

Each package owns its subcommands in a module with ``register(subparsers)``; this module only
lists them, so a part's options and help live next to its code. A handler returns the process
exit code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Modules that add subcommands, in the order ``shopfleet --help`` lists them.
COMMAND_MODULES = (
    "shopfleet.demo",  # demo
    "edge_agent.cli",  # agent
    "fleet_controller.cli",  # controller, broker-config
    "fleet_controller.rollout.cli",  # release, rollout, manifests
    "hardware.cli",  # hw simulate, read, calibrate
    "fleet_controller.accounts.cli",  # users, tokens
    "vision.cli",  # vision fetch-model, quantize, run, eval-tracker
)


def build_parser() -> argparse.ArgumentParser:
    """Return the top-level parser with every subcommand registered."""
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
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, set up logging and run the chosen subcommand."""
    parser = build_parser()
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
