"""The demo's logins: one user per role, each with a fresh random password printed by the demo.

The controller holds no demo accounts and no fixed passwords; the demo creates (or resets) its
users here through the account store, in one function (:func:`_set_login`), so a change of the
store's API touches one place.
"""

from __future__ import annotations

import secrets
from typing import Any

DEMO_ROLES: dict[str, str] = {"viewer": "viewer", "reviewer": "reviewer", "operator": "operator", "mlops": "ml-engineer", "admin": "admin"}
"""Demo user name -> role (one per role the dashboard knows)."""


def demo_password() -> str:
    """Return a fresh password (about 96 bits) that is easy to copy from the terminal."""
    return secrets.token_urlsafe(12)


def _set_login(engine: Any, username: str, password: str, role: str) -> None:
    """Make ``username`` exist with ``role`` and ``password`` (created, or reset if it exists)."""
    from fleet_controller.web.accounts.store import AccountStore

    AccountStore(engine).put_user(username, password, role)


def create_demo_users(engine: Any) -> dict[str, str]:
    """Create or reset one demo user per role on ``engine``; return ``{username: password}`` to print."""
    creds = {username: demo_password() for username in DEMO_ROLES}
    for username, role in DEMO_ROLES.items():
        _set_login(engine, username, creds[username], role)
    return creds
