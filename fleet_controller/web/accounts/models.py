"""SQL tables of accounts: users, browser sessions and API tokens.

Secrets are never stored: passwords as argon2 hashes, session ids and API tokens as SHA-256
digests (they are 256-bit random values, so a fast hash is enough; a slow one would only slow
down every request). Times are Unix seconds (floats), like the wire protocol, so both engines
compare them the same way. Schema changes go through ``migrations/versions/0003_accounts.py``.
"""

from __future__ import annotations

from sqlalchemy import Boolean, Float, ForeignKey, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from fleet_controller.registry.db import Base


class User(Base):
    """A person who logs in to the dashboard or owns API tokens."""

    __tablename__ = "users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    username: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    password_hash: Mapped[str] = mapped_column(String(255), nullable=False)
    role: Mapped[str] = mapped_column(String(32), nullable=False)
    must_change_password: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    created_at: Mapped[float] = mapped_column(Float, nullable=False)
    disabled_at: Mapped[float | None] = mapped_column(Float, nullable=True)  # added by 0005_admin_audit


class Session(Base):
    """A logged-in browser; the cookie holds the id, the table its SHA-256."""

    __tablename__ = "user_sessions"
    id_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True)
    csrf_token: Mapped[str] = mapped_column(String(64), nullable=False)
    created_at: Mapped[float] = mapped_column(Float, nullable=False)
    expires_at: Mapped[float] = mapped_column(Float, nullable=False)


class ApiToken(Base):
    """A bearer token for the CLI and automation; acts with its user's role."""

    __tablename__ = "api_tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), nullable=False)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True)
    prefix: Mapped[str] = mapped_column(String(16), unique=True, nullable=False)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    created_at: Mapped[float] = mapped_column(Float, nullable=False)
    last_used_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)


ACCOUNT_TABLES = (User.__table__, Session.__table__, ApiToken.__table__)
