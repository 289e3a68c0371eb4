"""The controller's subcommands: ``shopfleet controller`` and ``shopfleet broker-config``.

Kept thin on purpose: parsing flags into the typed settings of :mod:`fleet_controller.settings`
and handing over to :class:`fleet_controller.service.ControllerService`; ``broker-config`` is
defined in :mod:`fleet_controller.broker_cli`. Heavy imports happen inside the handlers, so
``shopfleet --help`` stays fast and the CLI root never pays for FastAPI or SQLAlchemy.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from fleet_controller.broker_cli import register_broker_config

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``controller`` and ``broker-config`` subcommands to the CLI root."""
    p = sub.add_parser(
        "controller",
        help="run the central fleet controller (MQTT intake, registry, REST API)",
        description=(
            "Run the fleet controller: a persistent QoS 1 MQTT intake that validates, dedupes and "
            "stores every message of every shop, a presence sweeper, a clock beacon, and the REST "
            "API with OpenAPI docs at /docs and Prometheus metrics at /metrics. Settings come from "
            "a YAML file, then SHOPFLEET_CONTROLLER_* environment variables, then these flags "
            "(later wins). See docs/controller.md."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", "-c", type=Path, help="YAML settings file (keys as in docs/controller.md)")
    p.add_argument("--data-dir", type=Path, help="directory for the default SQLite database (default: platform data dir)")
    p.add_argument("--db-url", help="SQLAlchemy URL of the registry, e.g. postgresql+psycopg://user@host/db (default: SQLite in the data dir)")
    p.add_argument("--broker", metavar="HOST:PORT", help="MQTT broker address (default: 127.0.0.1:1883)")
    p.add_argument("--mqtt-username", help="MQTT username of the controller (see 'shopfleet broker-config')")
    p.add_argument("--mqtt-password-file", type=Path, help="file whose first line is the MQTT password (keeps it out of ps)")
    p.add_argument("--client-id", help="stable MQTT client id of the persistent session (default: shopfleet-controller)")
    p.add_argument("--shared-group", help="MQTT 5 shared-subscription group, to run several controllers on one stream")
    p.add_argument("--api", metavar="HOST:PORT", help="where the REST API listens (default: 127.0.0.1:8080; port 0 picks a free one)")
    p.add_argument("--no-migrate", action="store_true", help="do not upgrade the database schema at start (fail if it is behind)")
    p.set_defaults(func=_run_controller)

    register_broker_config(sub)  # its options and handler live in fleet_controller/broker_cli.py


def _run_controller(args: argparse.Namespace) -> int:
    from fleet_controller.service import run_controller
    from fleet_controller.settings import SettingsError, load_settings, overrides_from_args

    try:
        settings = load_settings(args.config, overrides_from_args(args))
    except SettingsError as exc:
        print(f"shopfleet controller: {exc}", file=sys.stderr)
        return 2
    return run_controller(settings, migrate=not args.no_migrate)
