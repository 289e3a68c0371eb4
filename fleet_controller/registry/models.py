"""Tables of the fleet registry: shops, nodes, heartbeat history, events, readings, replies, reports.

Timestamps are Unix seconds in ``Float`` columns: the same value the wire protocol carries, no
time-zone ambiguity between SQLite (which has no time-zone type) and PostgreSQL, and cheap to
compare in the presence sweep. Free-form data (labels, facts, pipelines) is ``JSON``, which both
engines store natively. History tables have an integer id so that retention can keep "the last N
per node" with one window-function query on both engines.

The schema itself is created by the Alembic revision ``0001_registry``; these classes must stay in
step with it (a test compares them).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKeyConstraint,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
)
from sqlalchemy.orm import Mapped, mapped_column

from fleet_controller.registry.db import Base


class Shop(Base):
    """A shop; created on its first message, or by ``register_shop`` with name/region/labels."""

    __tablename__ = "shops"
    id: Mapped[str] = mapped_column(String(63), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    region: Mapped[str] = mapped_column(String(100), default="", index=True)
    labels: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    timezone: Mapped[str] = mapped_column(String(64), default="UTC")
    created_at: Mapped[float] = mapped_column(Float)
    # The node whose reported state decides the shop's rollouts (``register_shop(applier=...)``;
    # if never declared, the first node to report, trust on first use). Added by 0004_trust.
    applier: Mapped[str | None] = mapped_column(String(63), nullable=True)


class Node(Base):
    """A shop computer: latest facts, presence, and the intake's sequence cursor."""

    __tablename__ = "nodes"
    shop_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    node_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    node_class: Mapped[str] = mapped_column(String(64), default="")
    arch: Mapped[str] = mapped_column(String(32), default="")
    agent_version: Mapped[str] = mapped_column(String(64), default="")
    release: Mapped[str | None] = mapped_column(String(128), nullable=True)
    facts: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    pipelines: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    facts_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    heartbeat_interval_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    session: Mapped[int] = mapped_column(Integer, default=0)
    presence: Mapped[str] = mapped_column(String(16), default="unknown", index=True)
    presence_reason: Mapped[str] = mapped_column(String(200), default="")
    presence_changed_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    last_seen: Mapped[float | None] = mapped_column(Float, nullable=True)
    first_seen: Mapped[float] = mapped_column(Float)
    epoch: Mapped[str] = mapped_column(String(64), default="")
    watermark: Mapped[int] = mapped_column(BigInteger, default=0)
    gaps: Mapped[list[list[int]]] = mapped_column(JSON, default=list)
    messages_total: Mapped[int] = mapped_column(Integer, default=0)
    duplicates_total: Mapped[int] = mapped_column(Integer, default=0)
    missing_total: Mapped[int] = mapped_column(Integer, default=0)
    retired_epochs: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)  # 0004_quarantine
    # 0015_exact_intake: the cursor's revision (compare-and-set between replicas) and reported evictions.
    cursor_rev: Mapped[int] = mapped_column(BigInteger, default=0)
    evicted_total: Mapped[int] = mapped_column(Integer, default=0)
    __table_args__ = (ForeignKeyConstraint(["shop_id"], ["shops.id"], ondelete="CASCADE"),)


class HeartbeatRecord(Base):
    """One heartbeat of a node (bounded history for charts and the node page)."""

    __tablename__ = "heartbeats"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    shop_id: Mapped[str] = mapped_column(String(63))
    node_id: Mapped[str] = mapped_column(String(63))
    epoch: Mapped[str] = mapped_column(String(64))
    seq: Mapped[int] = mapped_column(BigInteger)
    ts: Mapped[float] = mapped_column(Float)
    received_at: Mapped[float] = mapped_column(Float)
    cpu_load_1m: Mapped[float | None] = mapped_column(Float, nullable=True)
    cpu_temp_c: Mapped[float | None] = mapped_column(Float, nullable=True)
    mem_available_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    disk_free_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    outbox_depth: Mapped[int] = mapped_column(Integer, default=0)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    pipelines: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # 0019_heartbeat_samples: the heartbeat's series samples (JSON text ``[[name, source, value], ...]``, the raw tier of
    # node series; NULL before that revision, whose samples are in ``series_raw``) and the writer that stored it.
    samples: Mapped[str | None] = mapped_column(Text, nullable=True)
    wid: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    __table_args__ = (Index("ix_heartbeats_node", "shop_id", "node_id", "id"), Index("ix_heartbeats_writer", "wid", "id"))


class EventRecord(Base):
    """A shop event or a node alert (the dashboard's live feed), plus presence changes."""

    __tablename__ = "events"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    shop_id: Mapped[str] = mapped_column(String(63))
    node_id: Mapped[str] = mapped_column(String(63))
    kind: Mapped[str] = mapped_column(String(16))  # "event" | "alert" | "presence"
    type: Mapped[str] = mapped_column(String(64))  # event type, alert name, or presence state
    state: Mapped[str] = mapped_column(String(16), default="")  # alert: firing/resolved
    severity: Mapped[str] = mapped_column(String(16), default="")
    source: Mapped[str] = mapped_column(String(128), default="")
    message: Mapped[str] = mapped_column(Text, default="")
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    at: Mapped[float] = mapped_column(Float)  # when it happened (node clock)
    received_at: Mapped[float] = mapped_column(Float)
    epoch: Mapped[str] = mapped_column(String(64), default="")
    seq: Mapped[int] = mapped_column(BigInteger, default=0)
    __table_args__ = (Index("ix_events_shop", "shop_id", "id"),)


class LatestReading(Base):
    """The latest value of each (shop, node, source, name): shelf weight, fridge temperature..."""

    __tablename__ = "readings"
    shop_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    node_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    source: Mapped[str] = mapped_column(String(128), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[float] = mapped_column(Float)
    unit: Mapped[str] = mapped_column(String(16), default="")
    labels: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    ts: Mapped[float] = mapped_column(Float)
    received_at: Mapped[float] = mapped_column(Float)


class CommandResultRecord(Base):
    """A node's answer to a command, by correlation id."""

    __tablename__ = "command_results"
    correlation_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    shop_id: Mapped[str] = mapped_column(String(63))
    node_id: Mapped[str] = mapped_column(String(63))
    ok: Mapped[bool] = mapped_column(Boolean)
    result: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    error: Mapped[str] = mapped_column(Text, default="")
    ts: Mapped[float] = mapped_column(Float)
    received_at: Mapped[float] = mapped_column(Float)


class ReportedStateRecord(Base):
    """The latest state each node reported about its shop's desired state (one row per node).

    Only the row of the shop's ``applier`` counts for the shop (:meth:`RegistryReader.reported_states`).
    Replaced the per-shop ``reported_states`` table in 0004_trust.
    """

    __tablename__ = "node_reported_states"
    shop_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    node_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    release: Mapped[str | None] = mapped_column(Text, nullable=True)
    revision: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))
    error: Mapped[str] = mapped_column(Text, default="")
    objects: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    ts: Mapped[float] = mapped_column(Float)
    received_at: Mapped[float] = mapped_column(Float)


class QuarantinedMessage(Base):
    """A message that parsed but could not be stored (or returned by the writer): kept raw for an operator.

    Created by the Alembic revision ``0004_quarantine``. ``payload`` is capped
    (``fleet_controller.registry.store.QUARANTINE_PAYLOAD_BYTES``); ``payload_bytes`` is the original size.
    """

    __tablename__ = "quarantine"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    received_at: Mapped[float] = mapped_column(Float)
    quarantined_at: Mapped[float] = mapped_column(Float)
    topic: Mapped[str] = mapped_column(String(512))
    shop_id: Mapped[str | None] = mapped_column(String(63), nullable=True)
    node_id: Mapped[str | None] = mapped_column(String(63), nullable=True)
    reason: Mapped[str] = mapped_column(String(32))
    error: Mapped[str] = mapped_column(Text)
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    payload_bytes: Mapped[int] = mapped_column(Integer)
    __table_args__ = (Index("ix_quarantine_reason", "reason", "id"),)
