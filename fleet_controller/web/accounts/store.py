"""Users, sessions and API tokens in the controller database.

Every function takes what it needs (engine, hasher, clock) as arguments, so tests run them on
SQLite and PostgreSQL with a cheap argon2 setting. Errors are :class:`AccountError` with a
message that says what to do; the CLI prints it as is.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import delete, select, update
from sqlalchemy.engine import CursorResult, Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session as OrmSession

from fleet_controller.web.accounts.models import ApiToken, Session, User
from fleet_controller.web.accounts.roles import Role, parse_role

log = logging.getLogger(__name__)

USERNAME_MAX = 64
MIN_PASSWORD_LENGTH = 10
SESSION_TTL_S = 12 * 3600.0
"""How long a browser session lasts. Longer saves operators logins; shorter limits what a stolen
cookie is worth."""
TOKEN_PREFIX = "sft_"


class AccountError(ValueError):
    """A request about accounts that cannot be done; the message says why and what to do."""


@dataclass(frozen=True)
class Principal:
    """Who is making a request: a user through a session or through an API token."""

    user_id: int
    username: str
    role: Role
    via: str  # "session" or "token"
    csrf_token: str | None = None  # set for sessions: state-changing requests must echo it
    must_change_password: bool = False


@dataclass(frozen=True)
class UserInfo:
    """A user as ``users list`` shows it."""

    username: str
    role: Role
    created_at: float
    must_change_password: bool
    disabled_at: float | None = None


@dataclass(frozen=True)
class TokenInfo:
    """An API token without its secret."""

    name: str
    prefix: str
    username: str
    created_at: float
    last_used_at: float | None
    revoked_at: float | None


def sha256_hex(value: str) -> str:
    """Return the SHA-256 hex digest of ``value`` (session ids and tokens are stored so)."""
    return hashlib.sha256(value.encode()).hexdigest()


def default_hasher() -> PasswordHasher:
    """Return the argon2id hasher with argon2-cffi's recommended (RFC 9106 low-memory) cost."""
    return PasswordHasher()


def generate_password() -> str:
    """Return a random password of about 120 bits that is easy to copy."""
    return secrets.token_urlsafe(15)


def validate_username(username: str) -> str:
    """Return ``username`` if it is acceptable, else raise ``AccountError`` naming the fix."""
    if not username or len(username) > USERNAME_MAX or not all(c.isalnum() or c in "-_.@" for c in username):
        raise AccountError(
            f"invalid username {username!r}: use 1-{USERNAME_MAX} letters, digits and '-', '_', '.', '@'"
        )
    return username


def validate_password(password: str) -> str:
    """Return ``password`` if long enough, else raise ``AccountError``."""
    if len(password) < MIN_PASSWORD_LENGTH:
        raise AccountError(f"password too short: use at least {MIN_PASSWORD_LENGTH} characters")
    return password


class AccountStore:
    """Accounts in one database; the only code that reads or writes the account tables."""

    def __init__(self, engine: Engine, hasher: PasswordHasher | None = None, clock: Callable[[], float] = time.time) -> None:
        self.engine = engine
        self.hasher = hasher or default_hasher()
        self.clock = clock
        # A hash of a random password, verified against when the user does not exist, so that
        # a login for an unknown name takes as long as one with a wrong password.
        self._dummy_hash = self.hasher.hash(secrets.token_hex(16))

    # ----- users ------------------------------------------------------------------------------

    def add_user(self, username: str, password: str, role: Role | str, must_change_password: bool = False) -> None:
        """Create a user; raise ``AccountError`` if the name is taken or invalid."""
        validate_username(username)
        validate_password(password)
        r = parse_role(str(role)) if not isinstance(role, Role) else role
        try:
            with OrmSession(self.engine) as s, s.begin():
                s.add(
                    User(
                        username=username,
                        password_hash=self.hasher.hash(password),
                        role=r.value,
                        must_change_password=must_change_password,
                        created_at=self.clock(),
                    )
                )
        except IntegrityError:
            raise AccountError(f"user {username!r} exists: pick another name or use 'users set-role'") from None

    def put_user(self, username: str, password: str, role: Role | str) -> None:
        """Create a user with ``password`` and ``role``, or give an existing one that password and role.

        For setups that provision known accounts (the demo, test fixtures); operators use
        ``shopfleet users add`` and ``passwd``. Raise ``AccountError`` for an invalid name or
        password and ``ValueError`` for an unknown role, before changing anything.
        """
        validate_username(username)
        validate_password(password)
        r = parse_role(str(role)) if not isinstance(role, Role) else role
        with OrmSession(self.engine) as s:
            exists = s.scalars(select(User.id).where(User.username == username)).first() is not None
        if exists:
            self.set_role(username, r)
            self.set_password(username, password)
        else:
            self.add_user(username, password, r)

    def list_users(self) -> list[UserInfo]:
        """Return every user, by name."""
        with OrmSession(self.engine) as s:
            rows = s.scalars(select(User).order_by(User.username)).all()
            return [UserInfo(u.username, Role(u.role), u.created_at, u.must_change_password, u.disabled_at) for u in rows]

    def count_users(self) -> int:
        """Return how many users exist."""
        with OrmSession(self.engine) as s:
            return len(s.scalars(select(User.id)).all())

    def _user(self, s: OrmSession, username: str) -> User:
        user = s.scalars(select(User).where(User.username == username)).first()
        if user is None:
            raise AccountError(f"no user {username!r}: see 'shopfleet users list'")
        return user

    def remove_user(self, username: str) -> None:
        """Delete a user with their sessions and tokens; refuse to remove the last admin."""
        with OrmSession(self.engine) as s, s.begin():
            user = self._user(s, username)
            if user.role == Role.ADMIN and user.disabled_at is None and self._admin_count(s) == 1:
                raise AccountError(f"{username!r} is the last admin: make another user admin first")
            s.execute(delete(Session).where(Session.user_id == user.id))
            s.execute(delete(ApiToken).where(ApiToken.user_id == user.id))
            s.delete(user)

    def _admin_count(self, s: OrmSession) -> int:
        return len(s.scalars(select(User.id).where(User.role == Role.ADMIN.value, User.disabled_at.is_(None))).all())

    def set_role(self, username: str, role: Role | str) -> None:
        """Change a user's role; refuse to demote the last admin."""
        r = parse_role(str(role))
        with OrmSession(self.engine) as s, s.begin():
            user = self._user(s, username)
            if user.role == Role.ADMIN and r != Role.ADMIN and user.disabled_at is None and self._admin_count(s) == 1:
                raise AccountError(f"{username!r} is the last admin: make another user admin first")
            user.role = r.value

    def set_password(self, username: str, password: str) -> None:
        """Set a new password, clear the must-change flag and end the user's sessions."""
        validate_password(password)
        with OrmSession(self.engine) as s, s.begin():
            user = self._user(s, username)
            user.password_hash = self.hasher.hash(password)
            user.must_change_password = False
            s.execute(delete(Session).where(Session.user_id == user.id))

    def require_password_change(self, username: str) -> None:
        """Make the user choose a new password at the next login."""
        with OrmSession(self.engine) as s, s.begin():
            self._user(s, username).must_change_password = True

    def verify_password(self, username: str, password: str) -> bool:
        """Return whether ``password`` is the user's; rehash it when the cost settings changed."""
        with OrmSession(self.engine) as s, s.begin():
            user = s.scalars(select(User).where(User.username == username)).first()
            stored = user.password_hash if user is not None else self._dummy_hash
            try:
                self.hasher.verify(stored, password)
            except (VerificationError, InvalidHashError):
                return False
            if user is None or user.disabled_at is not None:
                return False
            if self.hasher.check_needs_rehash(stored):
                user.password_hash = self.hasher.hash(password)
            return True

    def set_disabled(self, username: str, disabled: bool) -> None:
        """Disable a user (no login; sessions ended; tokens stop working) or enable them again.

        The last enabled admin cannot be disabled (nobody could manage users any more). Disabling
        keeps the user's row, tokens and audit trail, unlike :meth:`remove_user`.
        """
        with OrmSession(self.engine) as s, s.begin():
            user = self._user(s, username)
            if not disabled:
                user.disabled_at = None
                return
            if user.disabled_at is not None:
                return
            if user.role == Role.ADMIN and self._admin_count(s) == 1:
                raise AccountError(f"{username!r} is the last enabled admin: make another user admin first")
            user.disabled_at = self.clock()
            s.execute(delete(Session).where(Session.user_id == user.id))

    def ensure_initial_admin(self, username: str = "admin") -> str | None:
        """Create an admin with a one-time password when there are no users; return the password."""
        if self.count_users() > 0:
            return None
        password = generate_password()
        try:
            self.add_user(username, password, Role.ADMIN, must_change_password=True)
        except AccountError:  # another replica created it at the same moment
            return None
        return password

    # ----- sessions ---------------------------------------------------------------------------

    def create_session(self, username: str, ttl_s: float = SESSION_TTL_S) -> tuple[str, str]:
        """Start a session for a user; return ``(session_id, csrf_token)`` (the id goes in the cookie)."""
        session_id = secrets.token_urlsafe(32)
        csrf = secrets.token_urlsafe(32)
        now = self.clock()
        with OrmSession(self.engine) as s, s.begin():
            user = self._user(s, username)
            s.execute(delete(Session).where(Session.expires_at < now))
            s.add(Session(id_hash=sha256_hex(session_id), user_id=user.id, csrf_token=csrf, created_at=now, expires_at=now + ttl_s))
        return session_id, csrf

    def session_principal(self, session_id: str) -> Principal | None:
        """Return who holds the session, or ``None`` if it is unknown or expired."""
        with OrmSession(self.engine) as s:
            row = s.execute(
                select(Session, User).join(User, User.id == Session.user_id).where(Session.id_hash == sha256_hex(session_id))
            ).first()
            if row is None or row[0].expires_at <= self.clock() or row[1].disabled_at is not None:
                return None
            sess, user = row
            return Principal(user.id, user.username, Role(user.role), "session", sess.csrf_token, user.must_change_password)

    def end_session(self, session_id: str) -> None:
        """Delete a session (logout)."""
        with OrmSession(self.engine) as s, s.begin():
            s.execute(delete(Session).where(Session.id_hash == sha256_hex(session_id)))

    # ----- API tokens -------------------------------------------------------------------------

    def create_token(self, username: str, name: str) -> str:
        """Create an API token for a user; return the secret (shown once, only its hash is kept)."""
        if not name or len(name) > 64:
            raise AccountError("token name must be 1-64 characters")
        prefix = secrets.token_hex(4)
        token = f"{TOKEN_PREFIX}{prefix}_{secrets.token_urlsafe(32)}"
        with OrmSession(self.engine) as s, s.begin():
            user = self._user(s, username)
            s.add(ApiToken(name=name, user_id=user.id, prefix=prefix, token_hash=sha256_hex(token), created_at=self.clock()))
        return token

    def list_tokens(self) -> list[TokenInfo]:
        """Return every token (without secrets)."""
        with OrmSession(self.engine) as s:
            rows = s.execute(select(ApiToken, User.username).join(User, User.id == ApiToken.user_id).order_by(ApiToken.id)).all()
            return [TokenInfo(t.name, t.prefix, u, t.created_at, t.last_used_at, t.revoked_at) for t, u in rows]

    def revoke_token(self, prefix_or_token: str) -> None:
        """Revoke a token by its prefix (as ``tokens list`` shows) or by the whole secret."""
        key = prefix_or_token
        if key.startswith(TOKEN_PREFIX):
            key = key[len(TOKEN_PREFIX):].split("_", 1)[0]
        with OrmSession(self.engine) as s, s.begin():
            result = s.execute(
                update(ApiToken).where(ApiToken.prefix == key, ApiToken.revoked_at.is_(None)).values(revoked_at=self.clock())
            )
            n = result.rowcount if isinstance(result, CursorResult) else 0
        if not n:
            raise AccountError(f"no active token with prefix {key!r}: see 'shopfleet tokens list'")

    def token_principal(self, token: str) -> Principal | None:
        """Return who owns an active token, or ``None``."""
        if not token.startswith(TOKEN_PREFIX):
            return None
        with OrmSession(self.engine) as s, s.begin():
            row = s.execute(
                select(ApiToken, User).join(User, User.id == ApiToken.user_id).where(ApiToken.token_hash == sha256_hex(token))
            ).first()
            if row is None or row[0].revoked_at is not None or row[1].disabled_at is not None:
                return None
            tok, user = row
            now = self.clock()
            if tok.last_used_at is None or now - tok.last_used_at > 60:  # one write a minute at most
                tok.last_used_at = now
            return Principal(user.id, user.username, Role(user.role), "token")
