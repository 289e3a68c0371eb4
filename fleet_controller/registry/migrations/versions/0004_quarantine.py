"""Intake safety: the dead-letter table of quarantined messages, and the epochs a node has left.

Revision ID: 0004_quarantine
Revises: 0001_registry
Create Date: 2026-12-02

A branch of its own off the registry (like releases and accounts), so it never conflicts with them.

* ``quarantine``: a message that parsed but could not be stored or returned by the registry writer
  is kept here raw (payload capped) with its reason and error, instead of holding the stream.
* ``nodes.retired_epochs``: the outbox epochs a node has moved away from; a message of one of them
  is refused, so an epoch can only move forward (a flip back would re-store old messages).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_quarantine"
down_revision = "0001_registry"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "quarantine",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("received_at", sa.Float(), nullable=False),
        sa.Column("quarantined_at", sa.Float(), nullable=False),
        sa.Column("topic", sa.String(512), nullable=False),
        sa.Column("shop_id", sa.String(63), nullable=True),
        sa.Column("node_id", sa.String(63), nullable=True),
        sa.Column("reason", sa.String(32), nullable=False),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column("payload_bytes", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_quarantine"),
    )
    op.create_index("ix_quarantine_reason", "quarantine", ["reason", "id"])
    with op.batch_alter_table("nodes") as batch:
        batch.add_column(sa.Column("retired_epochs", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("nodes") as batch:
        batch.drop_column("retired_epochs")
    op.drop_index("ix_quarantine_reason", table_name="quarantine")
    op.drop_table("quarantine")
