"""SQL tables of alerts, silences, pending timers and notification channels.

Schemas: ``0003_accounts`` (alerts, silences) and ``0006_alert_lifecycle`` (flaps, details,
pending timers, channels, silence undo), both in ``fleet_controller/registry/migrations/versions``.

An alert row lives from the moment its condition holds until it has been clear for the rule's
``resolve_after_s``; the ``key`` (rule, shop, node, source) deduplicates: while a row with that key
is open, the evaluator updates it instead of opening another, and a condition that clears and
comes back within ``resolve_after_s`` counts as a flap of the same row. A silence mutes a key until
a time (or until someone expires it), so an alert that clears and comes back within the silence
stays quiet.
"""

from __future__ import annotations

from sqlalchemy import JSON, Boolean, Float, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from fleet_controller.registry.db import Base


class AlertRecord(Base):
    """One alert, firing or resolved."""

    __tablename__ = "alerts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    key: Mapped[str] = mapped_column(String(255), nullable=False, index=True)
    rule: Mapped[str] = mapped_column(String(64), nullable=False)
    shop_id: Mapped[str] = mapped_column(String(63), nullable=False)
    node_id: Mapped[str] = mapped_column(String(63), nullable=False, default="")
    source: Mapped[str] = mapped_column(String(128), nullable=False, default="")
    severity: Mapped[str] = mapped_column(String(16), nullable=False)
    summary: Mapped[str] = mapped_column(Text, nullable=False, default="")
    value: Mapped[float | None] = mapped_column(Float, nullable=True)
    state: Mapped[str] = mapped_column(String(16), nullable=False)  # firing | resolved
    started_at: Mapped[float] = mapped_column(Float, nullable=False)  # when the condition began (not when it fired)
    updated_at: Mapped[float] = mapped_column(Float, nullable=False)
    resolved_at: Mapped[float | None] = mapped_column(Float, nullable=True)  # when the condition cleared for good
    acked_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    acked_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    details: Mapped[str] = mapped_column(Text, nullable=False, default="")  # the raw text (OS error, node message)
    runbook: Mapped[str] = mapped_column(Text, nullable=False, default="")  # what to do, as the rule said when it fired
    flaps: Mapped[int] = mapped_column(Integer, nullable=False, default=0)  # times it cleared and came back
    clear_since: Mapped[float | None] = mapped_column(Float, nullable=True)  # condition clear since (resolving)
    __table_args__ = (Index("ix_alerts_state_shop", "state", "shop_id"),)


class Silence(Base):
    """A mute on one alert key until a time; expiring it early (undo) sets ``until`` to then."""

    __tablename__ = "alert_silences"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    key: Mapped[str] = mapped_column(String(255), nullable=False, index=True)
    until: Mapped[float] = mapped_column(Float, nullable=False)
    created_by: Mapped[str] = mapped_column(String(64), nullable=False)
    created_at: Mapped[float] = mapped_column(Float, nullable=False)
    comment: Mapped[str] = mapped_column(Text, nullable=False, default="")
    expired_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    expired_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class PendingCondition(Base):
    """Since when a "for N seconds" condition has held, so the timer survives a controller restart."""

    __tablename__ = "alert_pending"
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    since: Mapped[float] = mapped_column(Float, nullable=False)


class Channel(Base):
    """A notification channel an admin manages in the UI: webhook, email (SMTP) or chat webhook."""

    __tablename__ = "alert_channels"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    kind: Mapped[str] = mapped_column(String(16), nullable=False)  # webhook | email | chat
    config: Mapped[dict[str, object]] = mapped_column(JSON, nullable=False)  # secrets included: never sent back whole
    severities: Mapped[str] = mapped_column(String(64), nullable=False, default="")  # comma list; empty: all
    shops: Mapped[str] = mapped_column(Text, nullable=False, default="")  # comma list; empty: all
    send_resolved: Mapped[bool] = mapped_column(Boolean, nullable=False, default=True)
    enabled: Mapped[bool] = mapped_column(Boolean, nullable=False, default=True)
    created_by: Mapped[str] = mapped_column(String(64), nullable=False)
    created_at: Mapped[float] = mapped_column(Float, nullable=False)
    updated_at: Mapped[float] = mapped_column(Float, nullable=False)
    last_outcome: Mapped[str | None] = mapped_column(String(16), nullable=True)  # sent | failed
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    last_attempt_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    sent_total: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    failed_total: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
