"""Roles as permission sets, and the permission every HTTP request needs.

Deny by default: :func:`required_permission` maps any method and path to one permission, and a
path it does not know needs ``admin`` to change anything. A route added later by anyone is
therefore guarded without remembering to add a dependency; routers may still ask for a stricter
permission with ``require(...)`` (see ``web``).
"""

from __future__ import annotations

from enum import StrEnum


class Permission(StrEnum):
    """One thing a user may do."""

    VIEW = "view"  # read every page and API
    ALERTS_ACK = "alerts:ack"  # acknowledge alerts
    ALERTS_SILENCE = "alerts:silence"  # silence alerts for a while
    ROLLOUTS = "rollouts:write"  # create releases, start/pause/resume/abort/rollback rollouts
    USERS = "users:admin"  # manage users and tokens
    AUDIT = "audit:view"  # read the audit log and export it
    ACTIONS = "shops:actions"  # remote actions: restart a pipeline, maintenance, re-send desired state
    FLEET_ADMIN = "fleet:admin"  # enroll shops and nodes, anything else that changes the fleet
    CARTS_READ = "carts:read"  # see carts, receipts and the review queue with its evidence
    CARTS_REVIEW = "carts:review"  # act on carts in review: fix a line, reassign, accept
    SECURITY_INGEST = "security:ingest"  # post security events (FalcoSidekick's machine account)


class Role(StrEnum):
    """The roles, from least to most powerful (``reviewer`` works the cart review queue only;
    ``auditor`` reads everything and the audit log, changes nothing; ``security-ingest`` is a
    machine account that may only post security events, not even read a page, so the token
    stored in a shop's cluster is worth nothing else to whoever takes it)."""

    SECURITY_INGEST = "security-ingest"
    VIEWER = "viewer"
    REVIEWER = "reviewer"
    AUDITOR = "auditor"
    OPERATOR = "operator"
    ML_ENGINEER = "ml-engineer"
    ADMIN = "admin"


ROLE_PERMISSIONS: dict[Role, frozenset[Permission]] = {
    Role.SECURITY_INGEST: frozenset({Permission.SECURITY_INGEST}),
    Role.VIEWER: frozenset({Permission.VIEW}),
    Role.REVIEWER: frozenset({Permission.VIEW, Permission.CARTS_READ, Permission.CARTS_REVIEW}),
    Role.AUDITOR: frozenset({Permission.VIEW, Permission.AUDIT, Permission.CARTS_READ}),
    Role.OPERATOR: frozenset({Permission.VIEW, Permission.ALERTS_ACK, Permission.ALERTS_SILENCE, Permission.ACTIONS}),
    Role.ML_ENGINEER: frozenset({Permission.VIEW, Permission.ROLLOUTS}),
    Role.ADMIN: frozenset(Permission),
}

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

# Path prefix -> permission needed to change something below it (longest prefix wins).
WRITE_PERMISSIONS: tuple[tuple[str, Permission], ...] = (
    ("/api/v1/releases", Permission.ROLLOUTS),
    ("/api/v1/carts", Permission.CARTS_REVIEW),
    ("/api/v1/models", Permission.ROLLOUTS),
    ("/api/v1/rollouts", Permission.ROLLOUTS),
    ("/api/v1/alerts", Permission.ALERTS_ACK),
    ("/api/v1/silences", Permission.ALERTS_SILENCE),
    ("/api/v1/users", Permission.USERS),
    ("/api/v1/tokens", Permission.USERS),
    ("/admin", Permission.USERS),
    ("/api/v1/actions", Permission.ACTIONS),
    ("/api/v1/security-events", Permission.SECURITY_INGEST),
    ("/logout", Permission.VIEW),
    ("/account", Permission.VIEW),
)


def parse_role(value: str) -> Role:
    """Return the role named ``value`` or raise ``ValueError`` listing the valid roles."""
    try:
        return Role(value)
    except ValueError:
        raise ValueError(f"unknown role {value!r}: use one of {', '.join(r.value for r in Role)}") from None


def has_permission(role: Role | str, permission: Permission) -> bool:
    """Return whether ``role`` grants ``permission``."""
    return permission in ROLE_PERMISSIONS[Role(role)]


def required_permission(method: str, path: str) -> Permission:
    """Return the permission a request needs: VIEW to read, the prefix's permission to write."""
    if method.upper() in SAFE_METHODS:
        return Permission.VIEW
    best: tuple[int, Permission] | None = None
    for prefix, perm in WRITE_PERMISSIONS:
        if (path == prefix or path.startswith(prefix + "/")) and (best is None or len(prefix) > best[0]):
            best = (len(prefix), perm)
    return best[1] if best else Permission.FLEET_ADMIN
