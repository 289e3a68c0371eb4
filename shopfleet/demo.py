"""``shopfleet demo``: a whole fleet on one machine (being built; see README)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``demo`` subcommand."""
    p = sub.add_parser("demo", help="run a broker, a controller and simulated shops on this machine")
    p.add_argument("--shops", type=int, default=3, help="number of simulated shops (default: %(default)s)")
    p.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    p.set_defaults(func=lambda args: 1)
