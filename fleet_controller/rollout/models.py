"""Tables of releases and rollouts, on the controller's one declarative Base.

Every step the executor takes is a row change here: a rollout's
status and plan, each shop's state in it, and an append-only event log. That is what lets a
restarted controller resume where it stopped, and what the CLI's ``status`` reads. The schema is
created by the Alembic revision ``0002_releases``; these classes must stay in step with it (a test
compares them).

Timestamps are Unix seconds in ``Float`` columns, as in the registry.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, BigInteger, Float, ForeignKeyConstraint, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from fleet_controller.registry.db import Base

ROLLOUT_STATES = ("running", "paused", "rolling_back", "completed", "failed", "aborted", "rolled_back", "expired")
"""``running``, ``paused`` and ``rolling_back`` are active; the rest are final."""
ACTIVE_ROLLOUT_STATES = ("running", "paused", "rolling_back")

SHOP_STATES = ("pending", "applying", "baking", "done", "failed", "rolling_back", "rolled_back", "skipped")
"""A shop's way through a rollout: pending -> applying -> baking -> done, or failed -> rolling_back -> rolled_back."""


class ReleaseRecord(Base):
    """A release: every image pinned by digest, the model package by sha256."""

    __tablename__ = "releases"
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    version: Mapped[str] = mapped_column(String(64))
    images: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    model: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    labels: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    created_at: Mapped[float] = mapped_column(Float)


class RolloutRecord(Base):
    """One rollout of a release: its policy, its plan, and where it stands."""

    __tablename__ = "rollouts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    release: Mapped[str] = mapped_column(String(128))
    policy: Mapped[dict[str, Any]] = mapped_column(JSON)
    plan: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), index=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    final_status: Mapped[str | None] = mapped_column(String(16), nullable=True)
    current_wave: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    deadline_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    __table_args__ = (ForeignKeyConstraint(["release"], ["releases.name"]),)


class RolloutShop(Base):
    """One shop in one rollout: its wave, state, the revisions published for it, and why."""

    __tablename__ = "rollout_shops"
    rollout_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    shop_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    wave: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16))
    from_release: Mapped[str | None] = mapped_column(String(128), nullable=True)
    revision: Mapped[int | None] = mapped_column(Integer, nullable=True)
    rollback_revision: Mapped[int | None] = mapped_column(Integer, nullable=True)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    applied_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    done_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    baseline: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    __table_args__ = (
        ForeignKeyConstraint(["rollout_id"], ["rollouts.id"], ondelete="CASCADE"),
        Index("ix_rollout_shops_state", "rollout_id", "state"),
    )


class RolloutEvent(Base):
    """Append-only log of what the executor did (and what an operator asked for)."""

    __tablename__ = "rollout_events"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    rollout_id: Mapped[int] = mapped_column(Integer)
    at: Mapped[float] = mapped_column(Float)
    kind: Mapped[str] = mapped_column(String(32))
    shop_id: Mapped[str | None] = mapped_column(String(63), nullable=True)
    message: Mapped[str] = mapped_column(Text, default="")
    __table_args__ = (Index("ix_rollout_events_rollout", "rollout_id", "id"),)


class ShopDesired(Base):
    """The desired state last published for each shop: revision counter and release."""

    __tablename__ = "shop_desired"
    shop_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    revision: Mapped[int] = mapped_column(Integer)
    release: Mapped[str] = mapped_column(String(128))
    rollout_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    published_at: Mapped[float] = mapped_column(Float)


class ExecutorLease(Base):
    """Leader lease: the one controller allowed to run the rollout executor until ``expires_at``."""

    __tablename__ = "executor_leases"
    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    holder: Mapped[str] = mapped_column(String(64))
    expires_at: Mapped[float] = mapped_column(Float)
