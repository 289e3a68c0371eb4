"""The controller's subcommands: ``shopfleet controller`` and ``shopfleet broker-config``.

Kept thin on purpose: parsing flags into the typed settings of :mod:`fleet_controller.settings`
and handing over to :class:`fleet_controller.service.ControllerService` or
:mod:`fleet_controller.broker_config`. Heavy imports happen inside the handlers, so
``shopfleet --help`` stays fast and the CLI root never pays for FastAPI or SQLAlchemy.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

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

    b = sub.add_parser(
        "broker-config",
        help="write a Mosquitto password file and ACL for the fleet's nodes",
        description=(
            "Write the Mosquitto files that enforce shop isolation: 'passwd' (PBKDF2-SHA512, the "
            "'$7$' format of mosquitto_passwd), 'acl' (each node user '<shop>.<node>' may publish "
            "only its own topics and its shop's state/reported, and read only its own commands, "
            "its shop's desired state and the controller's presence and clock; the controller "
            "user reads and writes everything), 'mosquitto.conf' to include them, and "
            "'credentials.json' (mode 0600) with every generated password. Passwords already in "
            "credentials.json are kept, so re-running after adding a node changes nothing else."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    b.add_argument("--nodes", type=Path, metavar="FILE", help="text file, one 'shop/node' per line ('#' starts a comment)")
    b.add_argument("--shop", action=_ShopAction, metavar="SHOP", help="a shop id; follow it with one or more --node (repeatable)")
    b.add_argument("--node", action=_NodeAction, metavar="NODE", dest="pairs", default=[], help="a node id of the --shop before it")
    b.add_argument("--out", type=Path, required=True, metavar="DIR", help="directory to write passwd, acl, mosquitto.conf, credentials.json")
    b.add_argument("--controller-user", default="controller", help="MQTT username of the controller (default: %(default)s)")
    b.set_defaults(func=_run_broker_config, current_shop=None)


class _ShopAction(argparse.Action):
    """``--shop S``: remember S so the ``--node`` flags after it belong to it."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        namespace.current_shop = values


class _NodeAction(argparse.Action):
    """``--node N``: add (current shop, N), or fail when no ``--shop`` came before."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        if namespace.current_shop is None:
            parser.error(f"--node {values} needs a --shop before it (e.g. --shop shop-a --node pi-1)")
        namespace.pairs = [*namespace.pairs, (namespace.current_shop, values)]


def _run_controller(args: argparse.Namespace) -> int:
    from fleet_controller.service import run_controller
    from fleet_controller.settings import SettingsError, load_settings, overrides_from_args

    try:
        settings = load_settings(args.config, overrides_from_args(args))
    except SettingsError as exc:
        print(f"shopfleet controller: {exc}", file=sys.stderr)
        return 2
    return run_controller(settings, migrate=not args.no_migrate)


def _run_broker_config(args: argparse.Namespace) -> int:
    from fleet_controller.broker_config import (
        BrokerConfigError,
        parse_node_file,
        write_broker_config,
    )

    try:
        pairs = list(args.pairs)
        if args.nodes is not None:
            pairs = parse_node_file(args.nodes) + pairs
        if not pairs:
            raise BrokerConfigError("no nodes given: pass --nodes FILE or --shop SHOP --node NODE ...")
        result = write_broker_config(pairs, args.out, controller_user=args.controller_user)
    except BrokerConfigError as exc:
        print(f"shopfleet broker-config: {exc}", file=sys.stderr)
        return 2
    print(
        f"wrote {result.password_file}, {result.acl_file} and {result.conf_file} for {len(pairs)} nodes; "
        f"passwords ({result.generated} new) are in {result.credentials_file} (mode 0600)"
    )
    return 0
