"""Trust: per-node reported state, the shop's declared applier, one-time enrollment tokens.

Revision ID: 0004_trust
Revises: 0001_registry
Create Date: 2026-11-28

A branch of its own off the registry, like releases and accounts.

* ``reported_states`` (one row per shop, written by whichever node reported last) becomes
  ``node_reported_states`` (one row per node). Existing rows are copied.
* ``shops.applier``: the node whose report decides the shop's rollouts. A shop that already has a
  reported state gets the node that wrote it, which is what the controller trusted until now.
* ``enrollment_tokens``: one-time tokens (stored as SHA-256) that let a new node fetch its broker
  credentials from the controller's API (``fleet_controller.web.enroll``).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_trust"
down_revision = "0001_registry"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "node_reported_states",
        sa.Column("shop_id", sa.String(63), nullable=False),
        sa.Column("node_id", sa.String(63), nullable=False),
        sa.Column("release", sa.Text(), nullable=True),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("error", sa.Text(), nullable=False, server_default=""),
        sa.Column("objects", sa.JSON(), nullable=False),
        sa.Column("ts", sa.Float(), nullable=False),
        sa.Column("received_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("shop_id", "node_id", name="pk_node_reported_states"),
    )
    cols = "shop_id, node_id, release, revision, status, error, objects, ts, received_at"
    op.execute(f"INSERT INTO node_reported_states ({cols}) SELECT {cols} FROM reported_states")
    with op.batch_alter_table("shops") as batch:
        batch.add_column(sa.Column("applier", sa.String(63), nullable=True))
    op.execute("UPDATE shops SET applier = (SELECT r.node_id FROM reported_states r WHERE r.shop_id = shops.id)")
    op.drop_table("reported_states")
    op.create_table(
        "enrollment_tokens",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("shop_id", sa.String(63), nullable=False),
        sa.Column("node_id", sa.String(63), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("created_by", sa.String(64), nullable=False, server_default=""),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.Column("used_at", sa.Float(), nullable=True),
        sa.Column("used_from", sa.String(64), nullable=False, server_default=""),
        sa.PrimaryKeyConstraint("id", name="pk_enrollment_tokens"),
        sa.UniqueConstraint("token_hash", name="uq_enrollment_tokens_token_hash"),
    )


def downgrade() -> None:
    op.drop_table("enrollment_tokens")
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
    op.execute(
        "INSERT INTO reported_states SELECT r.shop_id, r.node_id, r.release, r.revision, r.status, r.error, r.objects, r.ts, r.received_at"
        " FROM node_reported_states r JOIN shops s ON s.id = r.shop_id AND s.applier = r.node_id"
    )
    with op.batch_alter_table("shops") as batch:
        batch.drop_column("applier")
    op.drop_table("node_reported_states")
