"""``shopfleet users`` and ``shopfleet tokens``: manage logins and API tokens in the controller database.

They work on the database directly (same ``--config``/``--db-url``/``--data-dir`` as
``shopfleet controller``), because they are what an admin uses before anyone can log in, and
while the controller is down. Passwords are never taken as arguments (they would show in
``ps`` and shell history): generated and printed once, or read from stdin.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from fleet_controller.web.accounts.roles import Role

if TYPE_CHECKING:
    from fleet_controller.web.accounts.store import AccountStore

ROLES = [r.value for r in Role]


def _db_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", type=Path, help="controller YAML settings file (its db_url/data_dir are used)")
    p.add_argument("--db-url", help="SQLAlchemy URL of the controller database (default: as 'shopfleet controller')")
    p.add_argument("--data-dir", type=Path, help="directory of the default SQLite database")


def _store(args: argparse.Namespace) -> AccountStore:
    # The database layer is imported here, not at the top: ``shopfleet --help`` builds this
    # module's parsers on machines that run only the agent (no SQLAlchemy, no Alembic).
    from fleet_controller.registry import migrations
    from fleet_controller.registry.db import create_engine
    from fleet_controller.settings import load_settings
    from fleet_controller.web.accounts.store import AccountStore

    overrides = {k: v for k, v in {"db_url": args.db_url, "data_dir": args.data_dir}.items() if v is not None}
    settings = load_settings(args.config, overrides)
    if settings.db_url is None:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = create_engine(settings.database_url())
    migrations.upgrade(engine)
    import getpass

    from fleet_controller.registry.audit import RequestActor, set_request_actor

    # Changes made here are audited like the admin pages', as the local OS user.
    set_request_actor(RequestActor(f"cli:{getpass.getuser()}"[:64], "local", "cli"))
    return AccountStore(engine)


def _audit(store: AccountStore, action: str, target: str, details: dict[str, str] | None = None) -> None:
    from fleet_controller.registry.audit import AuditLog

    AuditLog(store.engine).record_here(action, target, details)


def _generate_password() -> str:
    from fleet_controller.web.accounts.store import generate_password

    return generate_password()


def _ts(v: float | None) -> str:
    return "-" if v is None else datetime.fromtimestamp(v, UTC).strftime("%Y-%m-%d %H:%M")


Command = Callable[[argparse.Namespace], int]


def _run(fn: Command) -> Command:
    """Turn a command's ``AccountError``/``SettingsError`` into its message on stderr and exit code 2."""

    def handler(args: argparse.Namespace) -> int:
        from fleet_controller.settings import SettingsError
        from fleet_controller.web.accounts.store import AccountError

        try:
            return fn(args)
        except (AccountError, SettingsError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2

    return handler


@_run
def users_add(args: argparse.Namespace) -> int:
    """Create a user; print a generated password unless one comes on stdin."""
    store = _store(args)
    password = sys.stdin.readline().rstrip("\n") if args.password_stdin else _generate_password()
    store.add_user(args.username, password, args.role, must_change_password=not args.password_stdin)
    _audit(store, "user.create", args.username, {"role": args.role})
    print(f"created {args.username} ({args.role})")
    if not args.password_stdin:
        print(f"one-time password: {password}  (shown once; the user must change it at first login)")
    return 0


@_run
def users_list(args: argparse.Namespace) -> int:
    """Print every user."""
    rows = _store(args).list_users()
    print(f"{'USER':<24} {'ROLE':<12} {'CREATED':<16} NOTE")
    for u in rows:
        print(f"{u.username:<24} {u.role.value:<12} {_ts(u.created_at):<16} {'must change password' if u.must_change_password else ''}")
    return 0


@_run
def users_remove(args: argparse.Namespace) -> int:
    """Delete a user with their sessions and tokens."""
    store = _store(args)
    store.remove_user(args.username)
    _audit(store, "user.remove", args.username)
    print(f"removed {args.username}")
    return 0


@_run
def users_set_role(args: argparse.Namespace) -> int:
    """Change a user's role."""
    store = _store(args)
    store.set_role(args.username, args.role)
    _audit(store, "user.role", args.username, {"role": args.role})
    print(f"{args.username} is now {args.role}")
    return 0


@_run
def users_reset_password(args: argparse.Namespace) -> int:
    """Give a user a new one-time password."""
    store = _store(args)
    password = _generate_password()
    store.set_password(args.username, password)
    store.require_password_change(args.username)
    _audit(store, "user.reset_password", args.username)
    print(f"one-time password for {args.username}: {password}  (shown once)")
    return 0


@_run
def tokens_create(args: argparse.Namespace) -> int:
    """Create an API token and print it once."""
    store = _store(args)
    token = store.create_token(args.user, args.name)
    _audit(store, "token.create", f"{args.user}/{args.name}", {"prefix": token.split("_")[1]})
    print(token)
    print(f"token {args.name!r} for {args.user}: shown once; send it as 'Authorization: Bearer <token>'", file=sys.stderr)
    return 0


@_run
def tokens_list(args: argparse.Namespace) -> int:
    """Print every token without its secret."""
    print(f"{'PREFIX':<10} {'NAME':<20} {'USER':<20} {'CREATED':<16} {'LAST USED':<16} REVOKED")
    for t in _store(args).list_tokens():
        print(f"{t.prefix:<10} {t.name:<20} {t.username:<20} {_ts(t.created_at):<16} {_ts(t.last_used_at):<16} {_ts(t.revoked_at)}")
    return 0


@_run
def tokens_revoke(args: argparse.Namespace) -> int:
    """Revoke a token by prefix or secret."""
    store = _store(args)
    store.revoke_token(args.token)
    _audit(store, "token.revoke", args.token.split("_")[1] if args.token.startswith("sft_") else args.token)
    print("revoked")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``users`` and ``tokens`` subcommands."""
    u = sub.add_parser("users", help="manage dashboard and API users (roles: " + ", ".join(ROLES) + ")",
                       description="Manage the users of the controller. Roles: viewer (read), operator (acknowledge and "
                                   "silence alerts), ml-engineer (releases and rollouts), admin (everything, users, enrollment).")
    us = u.add_subparsers(dest="users_command", metavar="ACTION", required=True)
    p = us.add_parser("add", help="create a user (prints a one-time password unless --password-stdin)")
    p.add_argument("username", help="login name: letters, digits, '-', '_', '.', '@'")
    p.add_argument("--role", required=True, choices=ROLES, help="what the user may do")
    p.add_argument("--password-stdin", action="store_true", help="read the password from the first line of stdin instead of generating one")
    _db_args(p)
    p.set_defaults(func=users_add)
    p = us.add_parser("list", help="list users and their roles")
    _db_args(p)
    p.set_defaults(func=users_list)
    p = us.add_parser("remove", help="delete a user, their sessions and tokens (never the last admin)")
    p.add_argument("username", help="user to delete")
    _db_args(p)
    p.set_defaults(func=users_remove)
    p = us.add_parser("set-role", help="change a user's role (never demotes the last admin)")
    p.add_argument("username", help="user to change")
    p.add_argument("role", choices=ROLES, help="the new role")
    _db_args(p)
    p.set_defaults(func=users_set_role)
    p = us.add_parser("reset-password", help="give a user a new one-time password (ends their sessions)")
    p.add_argument("username", help="user whose password to reset")
    _db_args(p)
    p.set_defaults(func=users_reset_password)

    t = sub.add_parser("tokens", help="manage API tokens for the CLI and automation",
                       description="API tokens act with their user's role on the REST API "
                                   "('Authorization: Bearer <token>'). Only a hash is stored; the token is shown once.")
    ts = t.add_subparsers(dest="tokens_command", metavar="ACTION", required=True)
    p = ts.add_parser("create", help="create a token and print it once")
    p.add_argument("--user", required=True, help="user the token acts as")
    p.add_argument("--name", required=True, help="what the token is for, e.g. 'ci' (1-64 characters)")
    _db_args(p)
    p.set_defaults(func=tokens_create)
    p = ts.add_parser("list", help="list tokens (prefix, name, user, last use) without secrets")
    _db_args(p)
    p.set_defaults(func=tokens_list)
    p = ts.add_parser("revoke", help="revoke a token at once")
    p.add_argument("token", help="the token's prefix (from 'tokens list') or the whole token")
    _db_args(p)
    p.set_defaults(func=tokens_revoke)
