"""Time series for charts: series_raw (samples per message), series_rollup (1-minute and 1-hour buckets), series_cursors.

Revision ID: 0007_series
Revises: 0001_registry
Create Date: 2026-11-29

A branch of its own off the registry (see fleet_controller/registry/series.py), so it never
conflicts with the other areas' revisions.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007_series"
down_revision = "0001_registry"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "series_raw",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("shop_id", sa.String(63), nullable=False),
        sa.Column("node_id", sa.String(63), nullable=False),
        sa.Column("ts", sa.Float(), nullable=False),
        sa.Column("samples", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_series_raw"),
    )
    op.create_index("ix_series_raw_shop_ts", "series_raw", ["shop_id", "ts"])
    op.create_table(
        "series_rollup",
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("shop_id", sa.String(63), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("bucket", sa.Float(), nullable=False),
        sa.Column("node_id", sa.String(63), nullable=False),
        sa.Column("source", sa.String(128), nullable=False),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.Column("total", sa.Float(), nullable=False),
        sa.Column("lo", sa.Float(), nullable=False),
        sa.Column("hi", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("step", "shop_id", "name", "bucket", "node_id", "source", name="pk_series_rollup"),
    )
    op.create_table(
        "series_cursors",
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("last_id", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("step", name="pk_series_cursors"),
    )


def downgrade() -> None:
    op.drop_table("series_cursors")
    op.drop_table("series_rollup")
    op.drop_index("ix_series_raw_shop_ts", table_name="series_raw")
    op.drop_table("series_raw")
