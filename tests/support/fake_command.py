"""A stand-in command module for tests/shopfleet/test_cli.py: its handler imports the Kubernetes
client when it runs, as the agent does when its config applies desired state to a cluster."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("agent", help="stand-in")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import kubernetes  # noqa: F401

    return 0
