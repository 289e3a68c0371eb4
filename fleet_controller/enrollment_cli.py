"""``shopfleet enroll-token``: make, list and revoke one-time enrollment tokens in the controller database.

Like ``shopfleet users``, it works on the database directly (same ``--config``/``--db-url``/
``--data-dir`` as ``shopfleet controller``), so an admin on the controller host can enroll the
first nodes before anyone has logged in; the same actions are on the API
(``/api/v1/enrollment-tokens``). Changes are audited as ``cli:<OS user>``. The token is printed
once; only its SHA-256 is stored.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fleet_controller.registry.enrollment import EnrollmentTokens
    from fleet_controller.settings import ControllerSettings

HELP = "one-time enrollment tokens for new nodes: create, list, revoke"


def _db_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", type=Path, help="controller YAML settings file (its db_url/data_dir are used)")
    p.add_argument("--db-url", help="SQLAlchemy URL of the controller database (default: as 'shopfleet controller')")
    p.add_argument("--data-dir", type=Path, help="directory of the default SQLite database")


def _open(args: argparse.Namespace) -> tuple[EnrollmentTokens, ControllerSettings]:
    import getpass

    from fleet_controller.registry import migrations
    from fleet_controller.registry.audit import RequestActor, set_request_actor
    from fleet_controller.registry.db import create_engine
    from fleet_controller.registry.enrollment import EnrollmentTokens
    from fleet_controller.settings import load_settings

    overrides = {k: v for k, v in {"db_url": args.db_url, "data_dir": args.data_dir}.items() if v is not None}
    settings = load_settings(args.config, overrides)
    if settings.db_url is None:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = create_engine(settings.database_url())
    migrations.upgrade(engine)
    set_request_actor(RequestActor(f"cli:{getpass.getuser()}"[:64], "local", "cli"))
    return EnrollmentTokens(engine), settings


def _ts(v: float | None) -> str:
    return "-" if v is None else datetime.fromtimestamp(v, UTC).strftime("%Y-%m-%d %H:%M:%S")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``enroll-token`` with ``create``, ``list`` and ``revoke``."""
    p = sub.add_parser(
        "enroll-token",
        help=HELP,
        description=(
            "One-time tokens that let a new node get its broker certificate from the controller "
            "('shopfleet agent enroll' on the node). A token is bound to one shop and node, works once, "
            "expires (--ttl, default enrollment.token_ttl_s or 1h) and is printed only when made. "
            "See docs/security.md (Enrollment)."
        ),
        epilog=(
            "  shopfleet enroll-token create --shop shop-a --node pi-3 --ttl 1h\n"
            "  shopfleet enroll-token list\n"
            "  shopfleet enroll-token revoke 7"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s = p.add_subparsers(dest="token_command", metavar="ACTION", required=True)
    q = s.add_parser("create", help="make a token for one node (printed once)",
                     description="Make a one-time enrollment token for SHOP/NODE and print it with the command to run on the node.")
    _db_args(q)
    q.add_argument("--shop", required=True, help="shop id of the new node")
    q.add_argument("--node", required=True, help="node id (its certificate's CN will be <shop>.<node>)")
    q.add_argument("--ttl", help="lifetime: seconds or 30m, 1h, 2d (default: enrollment.token_ttl_s, else 1h; at most 7d)")
    q.add_argument("--controller-url", default="https://CONTROLLER:8443", help="the controller's https address, for the printed command")
    q.set_defaults(func=_create)
    q = s.add_parser("list", help="list tokens and their state (never the secrets)", description="List enrollment tokens, newest first.")
    _db_args(q)
    q.add_argument("--shop", help="only this shop")
    q.set_defaults(func=_list)
    q = s.add_parser("revoke", help="revoke an unused token", description="Delete an unused token so it can never enroll a node.")
    _db_args(q)
    q.add_argument("id", type=int, help="the token's id ('list' shows it)")
    q.set_defaults(func=_revoke)


def _create(args: argparse.Namespace) -> int:
    from fleet_controller.registry.audit import AuditLog
    from fleet_controller.registry.enrollment import DEFAULT_TTL_S, EnrollmentError
    from fleet_controller.settings import SettingsError

    try:
        tokens, settings = _open(args)
        ttl = args.ttl if args.ttl is not None else (settings.enrollment.token_ttl_s if settings.enrollment else DEFAULT_TTL_S)
        from fleet_controller.registry.audit import request_actor

        who = request_actor()
        token, rec = tokens.create(args.shop, args.node, ttl, who.actor if who else "cli")
    except (EnrollmentError, SettingsError) as exc:
        print(f"shopfleet enroll-token create: {exc}", file=sys.stderr)
        return 2
    AuditLog(tokens.engine).record_here("enrollment_token.create", f"{rec.shop}/{rec.node}",
                                        {"id": rec.id, "expires_at": rec.expires_at}, shop=rec.shop)
    print(f"enrollment token {rec.id} for {rec.shop}/{rec.node}, valid until {_ts(rec.expires_at)} UTC, works once:")
    print(token)
    print("(shown once; only its hash is stored)\n\non the node, with the fleet CA certificate ca.crt and the token in TOKEN_FILE:")
    print(f"  shopfleet agent enroll --controller {args.controller_url} --token-file TOKEN_FILE --ca-file ca.crt --out /etc/shopfleet/tls")
    return 0


def _list(args: argparse.Namespace) -> int:
    import time

    from fleet_controller.settings import SettingsError

    try:
        tokens, _ = _open(args)
    except SettingsError as exc:
        print(f"shopfleet enroll-token list: {exc}", file=sys.stderr)
        return 2
    now = time.time()
    print(f"{'ID':>5} {'SHOP/NODE':<32} {'STATE':<8} {'EXPIRES (UTC)':<20} {'USED (UTC)':<20} {'FROM':<16} BY")
    for t in tokens.list(shop=args.shop):
        print(f"{t.id:>5} {t.shop + '/' + t.node:<32} {t.state(now):<8} {_ts(t.expires_at):<20} {_ts(t.used_at):<20} "
              f"{t.used_from or '-':<16} {t.created_by or '-'}")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    from fleet_controller.registry.audit import AuditLog
    from fleet_controller.registry.enrollment import EnrollmentError
    from fleet_controller.settings import SettingsError

    try:
        tokens, _ = _open(args)
        rec = tokens.revoke(args.id)
    except (EnrollmentError, SettingsError) as exc:
        print(f"shopfleet enroll-token revoke: {exc}", file=sys.stderr)
        return 2
    AuditLog(tokens.engine).record_here("enrollment_token.revoke", f"{rec.shop}/{rec.node}", {"id": rec.id}, shop=rec.shop)
    print(f"revoked enrollment token {rec.id} of {rec.shop}/{rec.node}")
    return 0
