"""SQL tables of alerts and silences (schema in ``migrations/versions/0003_accounts.py``).

An alert row lives from the moment its condition holds until it clears; the ``key`` (rule,
shop, node, source) deduplicates: while a row with that key is firing, the evaluator updates it
instead of opening another. A silence mutes a key until a time, so an alert that clears and
comes back within the silence stays quiet.
"""

from __future__ import annotations

from sqlalchemy import Float, Index, Integer, String, Text
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
    started_at: Mapped[float] = mapped_column(Float, nullable=False)
    updated_at: Mapped[float] = mapped_column(Float, nullable=False)
    resolved_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    acked_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    acked_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    __table_args__ = (Index("ix_alerts_state_shop", "state", "shop_id"),)


class Silence(Base):
    """A mute on one alert key until a time."""

    __tablename__ = "alert_silences"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    key: Mapped[str] = mapped_column(String(255), nullable=False, index=True)
    until: Mapped[float] = mapped_column(Float, nullable=False)
    created_by: Mapped[str] = mapped_column(String(64), nullable=False)
    created_at: Mapped[float] = mapped_column(Float, nullable=False)
    comment: Mapped[str] = mapped_column(Text, nullable=False, default="")
