"""Fleet registry: shops, nodes, heartbeat history, events, latest readings, command results, reported state.

Revision ID: 0001_registry
Revises:
Create Date: 2026-11-27

The root of every branch: releases (0002_releases) and accounts (0003_accounts) revise it.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001_registry"
down_revision = None
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "shops",
        sa.Column("id", sa.String(63), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False, server_default=""),
        sa.Column("region", sa.String(100), nullable=False, server_default=""),
        sa.Column("labels", sa.JSON(), nullable=False),
        sa.Column("timezone", sa.String(64), nullable=False, server_default="UTC"),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_shops"),
    )
    op.create_index("ix_shops_region", "shops", ["region"])
    op.create_table(
        "nodes",
        sa.Column("shop_id", sa.String(63), nullable=False),
        sa.Column("node_id", sa.String(63), nullable=False),
        sa.Column("node_class", sa.String(64), nullable=False, server_default=""),
        sa.Column("arch", sa.String(32), nullable=False, server_default=""),
        sa.Column("agent_version", sa.String(64), nullable=False, server_default=""),
        sa.Column("release", sa.String(128), nullable=True),
        sa.Column("facts", sa.JSON(), nullable=True),
        sa.Column("pipelines", sa.JSON(), nullable=True),
        sa.Column("metrics", sa.JSON(), nullable=True),
        sa.Column("facts_at", sa.Float(), nullable=True),
        sa.Column("heartbeat_interval_s", sa.Float(), nullable=True),
        sa.Column("session", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("presence", sa.String(16), nullable=False, server_default="unknown"),
        sa.Column("presence_reason", sa.String(200), nullable=False, server_default=""),
        sa.Column("presence_changed_at", sa.Float(), nullable=True),
        sa.Column("last_seen", sa.Float(), nullable=True),
        sa.Column("first_seen", sa.Float(), nullable=False),
        sa.Column("epoch", sa.String(64), nullable=False, server_default=""),
        sa.Column("watermark", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("gaps", sa.JSON(), nullable=False),
        sa.Column("messages_total", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("duplicates_total", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("missing_total", sa.Integer(), nullable=False, server_default="0"),
        sa.PrimaryKeyConstraint("shop_id", "node_id", name="pk_nodes"),
        sa.ForeignKeyConstraint(["shop_id"], ["shops.id"], name="fk_nodes_shop_id_shops", ondelete="CASCADE"),
    )
    op.create_index("ix_nodes_presence", "nodes", ["presence"])
    op.create_table(
        "heartbeats",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("shop_id", sa.String(63), nullable=False),
        sa.Column("node_id", sa.String(63), nullable=False),
        sa.Column("epoch", sa.String(64), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("ts", sa.Float(), nullable=False),
        sa.Column("received_at", sa.Float(), nullable=False),
        sa.Column("cpu_load_1m", sa.Float(), nullable=True),
        sa.Column("cpu_temp_c", sa.Float(), nullable=True),
        sa.Column("mem_available_bytes", sa.BigInteger(), nullable=True),
        sa.Column("disk_free_bytes", sa.BigInteger(), nullable=True),
        sa.Column("outbox_depth", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("pipelines", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_heartbeats"),
    )
    op.create_index("ix_heartbeats_node", "heartbeats", ["shop_id", "node_id", "id"])
    op.create_table(
        "events",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("shop_id", sa.String(63), nullable=False),
        sa.Column("node_id", sa.String(63), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False, server_default=""),
        sa.Column("severity", sa.String(16), nullable=False, server_default=""),
        sa.Column("source", sa.String(128), nullable=False, server_default=""),
        sa.Column("message", sa.Text(), nullable=False, server_default=""),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.Column("at", sa.Float(), nullable=False),
        sa.Column("received_at", sa.Float(), nullable=False),
        sa.Column("epoch", sa.String(64), nullable=False, server_default=""),
        sa.Column("seq", sa.BigInteger(), nullable=False, server_default="0"),
        sa.PrimaryKeyConstraint("id", name="pk_events"),
    )
    op.create_index("ix_events_shop", "events", ["shop_id", "id"])
    op.create_table(
        "readings",
        sa.Column("shop_id", sa.String(63), nullable=False),
        sa.Column("node_id", sa.String(63), nullable=False),
        sa.Column("source", sa.String(128), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.Column("unit", sa.String(16), nullable=False, server_default=""),
        sa.Column("labels", sa.JSON(), nullable=False),
        sa.Column("ts", sa.Float(), nullable=False),
        sa.Column("received_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("shop_id", "node_id", "source", "name", name="pk_readings"),
    )
    op.create_table(
        "command_results",
        sa.Column("correlation_id", sa.String(64), nullable=False),
        sa.Column("shop_id", sa.String(63), nullable=False),
        sa.Column("node_id", sa.String(63), nullable=False),
        sa.Column("ok", sa.Boolean(), nullable=False),
        sa.Column("result", sa.JSON(), nullable=False),
        sa.Column("error", sa.Text(), nullable=False, server_default=""),
        sa.Column("ts", sa.Float(), nullable=False),
        sa.Column("received_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("correlation_id", name="pk_command_results"),
    )
    op.create_table(
        "reported_states",
        sa.Column("shop_id", sa.String(63), nullable=False),
        sa.Column("node_id", sa.String(63), nullable=False),
        sa.Column("release", sa.Text(), nullable=True),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("error", sa.Text(), nullable=False, server_default=""),
        sa.Column("objects", sa.JSON(), nullable=False),
        sa.Column("ts", sa.Float(), nullable=False),
        sa.Column("received_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("shop_id", name="pk_reported_states"),
    )


def downgrade() -> None:
    for table in ("reported_states", "command_results", "readings", "events", "heartbeats", "nodes", "shops"):
        op.drop_table(table)
