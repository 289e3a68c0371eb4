"""Alert lifecycle: flaps and hysteresis, raw details, pending timers, silence undo, channels.

Revision ID: 0006_alert_lifecycle
Revises: 0001_registry
Depends on: 0003_accounts (which created the alert tables)
Create Date: 2026-11-29

A branch of its own off the registry (like releases, accounts and trust), so it never conflicts
with the others; it alters tables 0003_accounts made, hence the dependency.

* ``alerts.details`` (raw text kept apart from the human summary), ``alerts.runbook`` (what to do), ``alerts.flaps`` (times the
  condition cleared and came back within ``resolve_after_s``), ``alerts.clear_since`` (condition
  clear since, while the alert waits out ``resolve_after_s``).
* ``alert_silences.expired_by`` / ``expired_at``: who ended a silence early (undo).
* ``alert_pending``: since when each "for N seconds" condition holds, so timers survive restarts.
* ``alert_channels``: notification channels managed by admins.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006_alert_lifecycle"
down_revision = "0001_registry"
branch_labels = None
depends_on = "0003_accounts"


def upgrade() -> None:
    with op.batch_alter_table("alerts") as b:
        b.add_column(sa.Column("details", sa.Text(), nullable=False, server_default=""))
        b.add_column(sa.Column("runbook", sa.Text(), nullable=False, server_default=""))
        b.add_column(sa.Column("flaps", sa.Integer(), nullable=False, server_default="0"))
        b.add_column(sa.Column("clear_since", sa.Float(), nullable=True))
    with op.batch_alter_table("alert_silences") as b:
        b.add_column(sa.Column("expired_by", sa.String(64), nullable=True))
        b.add_column(sa.Column("expired_at", sa.Float(), nullable=True))
    op.create_table(
        "alert_pending",
        sa.Column("key", sa.String(255), nullable=False),
        sa.Column("since", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("key", name="pk_alert_pending"),
    )
    op.create_table(
        "alert_channels",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("severities", sa.String(64), nullable=False),
        sa.Column("shops", sa.Text(), nullable=False),
        sa.Column("send_resolved", sa.Boolean(), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("created_by", sa.String(64), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.Column("last_outcome", sa.String(16), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("last_attempt_at", sa.Float(), nullable=True),
        sa.Column("sent_total", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("failed_total", sa.Integer(), nullable=False, server_default="0"),
        sa.PrimaryKeyConstraint("id", name="pk_alert_channels"),
        sa.UniqueConstraint("name", name="uq_alert_channels_name"),
    )


def downgrade() -> None:
    op.drop_table("alert_channels")
    op.drop_table("alert_pending")
    with op.batch_alter_table("alert_silences") as b:
        b.drop_column("expired_at")
        b.drop_column("expired_by")
    with op.batch_alter_table("alerts") as b:
        b.drop_column("clear_since")
        b.drop_column("flaps")
        b.drop_column("runbook")
        b.drop_column("details")
