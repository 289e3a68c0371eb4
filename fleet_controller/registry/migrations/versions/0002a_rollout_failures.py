"""Rollout failures: the check that failed each shop of a rollout, kept forever.

Revision ID: 0002a_rollout_failures
Revises: 0002_releases
Create Date: 2026-11-29

A branch of its own off the releases revision, so it never conflicts with other additions.
Rows are only ever inserted (one per rollout and shop, the first failure wins): a later
rollback, abort or retry changes the rollout's and the shop's state, never this record.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002a_rollout_failures"
down_revision = "0002_releases"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "rollout_failures",
        sa.Column("rollout_id", sa.Integer(), nullable=False),
        sa.Column("shop_id", sa.String(63), nullable=False),
        sa.Column("gate", sa.String(32), nullable=False),
        sa.Column("value", sa.Float(), nullable=True),
        sa.Column("threshold", sa.Float(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("rollout_id", "shop_id", name="pk_rollout_failures"),
        sa.ForeignKeyConstraint(["rollout_id"], ["rollouts.id"], name="fk_rollout_failures_rollout_id_rollouts", ondelete="CASCADE"),
    )


def downgrade() -> None:
    op.drop_table("rollout_failures")
