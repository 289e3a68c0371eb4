"""One-time enrollment tokens: how a new node proves, once, that an admin expects it.

An admin creates a token for one shop and node (``shopfleet enroll-token create`` or
``POST /api/v1/enrollment-tokens``); it is shown once and given to whoever installs the node,
who runs ``shopfleet agent enroll`` with it. The controller then signs the node's certificate
(``fleet_controller.web.enrollment_api``). A token:

* is 32 random bytes (``sfe_`` + URL-safe base64), stored only as its SHA-256: a stolen database
  gives no usable token, and the secret has far too much entropy for a slow hash to matter;
* is bound to its shop and node: the certificate's CN comes from the token, never from the node;
* expires (``ttl``, one hour by default, at most a week) and is **single use**: it is marked used
  in the same transaction that signs the certificate, with a conditional update, so two
  concurrent requests with one token cannot both succeed, and a failed signing leaves it unused;
* can be revoked while unused (the row is deleted; the audit log keeps who made and revoked it).

Looking a token up by its hash leaks nothing about the token through timing (an attacker would
have to find SHA-256 preimages); the stored and computed digests are still compared with
:func:`hmac.compare_digest`.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import BigInteger, Float, Integer, String, delete, insert, select, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Mapped, mapped_column

from edge_agent.protocol import validate_id
from fleet_controller.registry.db import Base, table_of
from shopfleet.errors import PermanentError

TOKEN_PREFIX = "sfe_"
TOKEN_BYTES = 32
DEFAULT_TTL_S = 3600.0
MAX_TTL_S = 7 * 86400.0
MIN_TTL_S = 60.0
MAX_TOKEN_CHARS = 128
"""A presented token longer than this is refused before hashing (no real token is)."""

T = TypeVar("T")


class EnrollmentError(PermanentError, ValueError):
    """An enrollment-token operation that cannot be done as asked; the message says what to fix."""

    default_reason = "enrollment"


class TokenRefused(EnrollmentError):
    """A presented token that does not enroll anything; ``reason`` is the metric label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message, reason=reason)


class EnrollmentTokenRow(Base):
    """The ``enrollment_tokens`` table (created by migration ``0004_trust``)."""

    __tablename__ = "enrollment_tokens"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True)
    shop_id: Mapped[str] = mapped_column(String(63), nullable=False)
    node_id: Mapped[str] = mapped_column(String(63), nullable=False)
    token_hash: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    created_by: Mapped[str] = mapped_column(String(64), nullable=False, default="")
    created_at: Mapped[float] = mapped_column(Float, nullable=False)
    expires_at: Mapped[float] = mapped_column(Float, nullable=False)
    used_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    used_from: Mapped[str] = mapped_column(String(64), nullable=False, default="")


TOKENS = table_of(EnrollmentTokenRow)


@dataclass(frozen=True)
class EnrollmentToken:
    """A token as lists show it (never the secret)."""

    id: int
    shop: str
    node: str
    created_by: str
    created_at: float
    expires_at: float
    used_at: float | None
    used_from: str

    def state(self, now: float) -> str:
        """Return ``used``, ``expired`` or ``unused``."""
        if self.used_at is not None:
            return "used"
        return "expired" if now >= self.expires_at else "unused"

    def as_dict(self, now: float) -> dict[str, Any]:
        """Return a JSON-ready dict with the state at ``now``."""
        return {"id": self.id, "shop": self.shop, "node": self.node, "created_by": self.created_by,
                "created_at": self.created_at, "expires_at": self.expires_at, "used_at": self.used_at,
                "used_from": self.used_from, "state": self.state(now)}


def token_hash(token: str) -> str:
    """Return the stored form of ``token``: its SHA-256, hex."""
    return hashlib.sha256(token.encode()).hexdigest()


_TTL_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_TTL_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_ttl(value: str | float | int) -> float:
    """Return seconds of ``value`` (``90``, ``30m``, ``1h``, ``2d``); raise ``EnrollmentError`` naming the limits."""
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        m = _TTL_RE.match(value)
        if not m:
            raise EnrollmentError(f"ttl {value!r}: use seconds or a number with s, m, h or d (e.g. 30m, 1h, 2d)")
        seconds = float(m.group(1)) * _TTL_UNITS[m.group(2)]
    if not MIN_TTL_S <= seconds <= MAX_TTL_S:
        raise EnrollmentError(f"ttl {value!r}: a token lives between {MIN_TTL_S:.0f} s and {MAX_TTL_S / 86400:.0f} days; "
                              "a short one is safer, make a new one when it expires")
    return seconds


def _row(r: Any) -> EnrollmentToken:
    return EnrollmentToken(r.id, r.shop_id, r.node_id, r.created_by, r.created_at, r.expires_at, r.used_at, r.used_from)


class EnrollmentTokens:
    """Create, list, revoke and redeem the enrollment tokens of one database."""

    def __init__(self, engine: Engine, clock: Callable[[], float] = time.time) -> None:
        self.engine = engine
        self.clock = clock

    def create(self, shop: str, node: str, ttl_s: float = DEFAULT_TTL_S, created_by: str = "") -> tuple[str, EnrollmentToken]:
        """Return (the token, its record) for ``shop``/``node``; the token exists only in the return value."""
        try:
            validate_id(shop, "shop id")
            validate_id(node, "node id")
        except ValueError as exc:
            raise EnrollmentError(str(exc)) from None
        ttl_s = parse_ttl(ttl_s)
        token = TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)
        now = self.clock()
        with self.engine.begin() as conn:
            new_id = conn.execute(insert(TOKENS).values(
                shop_id=shop, node_id=node, token_hash=token_hash(token), created_by=(created_by or "")[:64],
                created_at=now, expires_at=now + ttl_s, used_at=None, used_from="",
            )).inserted_primary_key
            assert new_id is not None
            row = conn.execute(select(TOKENS).where(TOKENS.c.id == new_id[0])).one()
        return token, _row(row)

    def list(self, *, shop: str | None = None, node: str | None = None) -> list[EnrollmentToken]:
        """Return tokens, newest first (optionally of one shop and node)."""
        stmt = select(TOKENS)
        if shop:
            stmt = stmt.where(TOKENS.c.shop_id == shop)
        if node:
            stmt = stmt.where(TOKENS.c.node_id == node)
        with self.engine.connect() as conn:
            return [_row(r) for r in conn.execute(stmt.order_by(TOKENS.c.id.desc()))]

    def get(self, token_id: int) -> EnrollmentToken | None:
        """Return the token with ``token_id``, if any."""
        with self.engine.connect() as conn:
            r = conn.execute(select(TOKENS).where(TOKENS.c.id == token_id)).first()
        return None if r is None else _row(r)

    def revoke(self, token_id: int) -> EnrollmentToken:
        """Delete an unused token so it can never enroll; return what it was. Raise if unknown or already used."""
        with self.engine.begin() as conn:
            r = conn.execute(select(TOKENS).where(TOKENS.c.id == token_id)).first()
            if r is None:
                raise EnrollmentError(f"no enrollment token {token_id}: 'shopfleet enroll-token list' shows them")
            if r.used_at is not None:
                raise EnrollmentError(f"enrollment token {token_id} was already used (by {r.used_from or '?'}): revoke the "
                                      f"node's credentials instead (POST /api/v1/nodes/{r.shop_id}/{r.node_id}/credentials/revoke)")
            conn.execute(delete(TOKENS).where(TOKENS.c.id == token_id))
        return _row(r)

    def redeem(self, token: str, source: str, issue: Callable[[EnrollmentToken, Connection], T]) -> tuple[EnrollmentToken, T]:
        """Mark ``token`` used by ``source`` and run ``issue(record, conn)`` in the same transaction; return both.

        Raise :class:`TokenRefused` (reason ``malformed``, ``unknown``, ``used`` or ``expired``)
        without touching anything. If ``issue`` raises, the token stays unused.
        """
        if not token.startswith(TOKEN_PREFIX) or len(token) > MAX_TOKEN_CHARS:
            raise TokenRefused("malformed", f"not an enrollment token (they start with {TOKEN_PREFIX!r}): copy the whole token an admin made")
        digest = token_hash(token)
        now = self.clock()
        with self.engine.begin() as conn:
            r = conn.execute(select(TOKENS).where(TOKENS.c.token_hash == digest)).first()
            if r is None or not hmac.compare_digest(r.token_hash, digest):
                raise TokenRefused("unknown", "unknown enrollment token (never made, revoked, or mistyped): ask an admin for a new one")
            if r.used_at is not None:
                raise TokenRefused("used", "this enrollment token was already used: tokens work once; ask an admin for a new one")
            if now >= r.expires_at:
                raise TokenRefused("expired", "this enrollment token has expired: ask an admin for a new one")
            done = conn.execute(
                update(TOKENS).where(TOKENS.c.id == r.id, TOKENS.c.used_at.is_(None))
                .values(used_at=now, used_from=(source or "")[:64])
            )
            if done.rowcount != 1:  # another request redeemed it between our read and our write
                raise TokenRefused("used", "this enrollment token was already used: tokens work once; ask an admin for a new one")
            record = _row(r)
            result = issue(record, conn)
        return EnrollmentToken(record.id, record.shop, record.node, record.created_by, record.created_at,
                               record.expires_at, now, (source or "")[:64]), result
