"""Releases and rollouts: releases, rollouts, rollout_shops, rollout_events, shop_desired, executor_leases.

Revision ID: 0002_releases
Revises: 0001_registry
Create Date: 2026-11-27

A branch of its own off the registry (accounts are 0003_accounts), so the two never conflict.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_releases"
down_revision = "0001_registry"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "releases",
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("images", sa.JSON(), nullable=False),
        sa.Column("model", sa.JSON(), nullable=True),
        sa.Column("labels", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_releases"),
    )
    op.create_table(
        "rollouts",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("release", sa.String(128), nullable=False),
        sa.Column("policy", sa.JSON(), nullable=False),
        sa.Column("plan", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False, server_default=""),
        sa.Column("final_status", sa.String(16), nullable=True),
        sa.Column("current_wave", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.Column("deadline_at", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_rollouts"),
        sa.ForeignKeyConstraint(["release"], ["releases.name"], name="fk_rollouts_release_releases"),
    )
    op.create_index("ix_rollouts_status", "rollouts", ["status"])
    op.create_table(
        "rollout_shops",
        sa.Column("rollout_id", sa.Integer(), nullable=False),
        sa.Column("shop_id", sa.String(63), nullable=False),
        sa.Column("wave", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("from_release", sa.String(128), nullable=True),
        sa.Column("revision", sa.Integer(), nullable=True),
        sa.Column("rollback_revision", sa.Integer(), nullable=True),
        sa.Column("started_at", sa.Float(), nullable=True),
        sa.Column("applied_at", sa.Float(), nullable=True),
        sa.Column("done_at", sa.Float(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False, server_default=""),
        sa.Column("baseline", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("rollout_id", "shop_id", name="pk_rollout_shops"),
        sa.ForeignKeyConstraint(["rollout_id"], ["rollouts.id"], name="fk_rollout_shops_rollout_id_rollouts", ondelete="CASCADE"),
    )
    op.create_index("ix_rollout_shops_state", "rollout_shops", ["rollout_id", "state"])
    op.create_table(
        "rollout_events",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("rollout_id", sa.Integer(), nullable=False),
        sa.Column("at", sa.Float(), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("shop_id", sa.String(63), nullable=True),
        sa.Column("message", sa.Text(), nullable=False, server_default=""),
        sa.PrimaryKeyConstraint("id", name="pk_rollout_events"),
    )
    op.create_index("ix_rollout_events_rollout", "rollout_events", ["rollout_id", "id"])
    op.create_table(
        "shop_desired",
        sa.Column("shop_id", sa.String(63), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("release", sa.String(128), nullable=False),
        sa.Column("rollout_id", sa.Integer(), nullable=True),
        sa.Column("published_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("shop_id", name="pk_shop_desired"),
    )
    op.create_table(
        "executor_leases",
        sa.Column("name", sa.String(32), nullable=False),
        sa.Column("holder", sa.String(64), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_executor_leases"),
    )


def downgrade() -> None:
    for table in ("executor_leases", "shop_desired", "rollout_events", "rollout_shops", "rollouts", "releases"):
        op.drop_table(table)
