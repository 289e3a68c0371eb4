"""Series roll-ups made by each writer from what it stores: raw rows name their writer, each writer keeps its cursors.

Revision ID: 0018_series_writers
Revises: 0007_series
Create Date: 2027-02-02

Until now the roll-up re-read every raw row of the last interval, parsed it and upserted a
minute and an hour bucket per node and series every minute, in the writer (issue #15: about 20
of every 60 s at 100,000 nodes), and its single id cursor could skip rows of a PostgreSQL
replica whose transaction committed after a higher id of the other replica's. Now each writer
folds what it commits in memory and flushes it (minutes every retention run, hours once an
hour); ``series_writers`` holds, per writer, the raw id up to which each tier holds its rows, so
another writer can fold a dead writer's unflushed rows again from ``series_raw`` (``wid``).

Rows stored before this revision belong to writer 0, whose cursors start at the old single
cursor: the first retention run folds whatever the old roll-up had not, then forgets writer 0.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0018_series_writers"
down_revision = "0007_series"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "series_writers",
        sa.Column("wid", _ID, autoincrement=True, nullable=False),
        sa.Column("instance", sa.String(200), nullable=False, server_default=""),
        sa.Column("started_at", sa.Float(), nullable=False),
        sa.Column("seen_at", sa.Float(), nullable=False),
        sa.Column("minute_upto", sa.BigInteger(), nullable=False),
        sa.Column("hour_upto", sa.BigInteger(), nullable=False),
        sa.Column("pending_upto", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("pending_hours", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("pending_parts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("pending_done", sa.Integer(), nullable=False, server_default="0"),
        sa.PrimaryKeyConstraint("wid", name="pk_series_writers"),
    )
    with op.batch_alter_table("series_raw") as batch:
        batch.add_column(sa.Column("wid", sa.BigInteger(), nullable=False, server_default="0"))
    op.create_index("ix_series_raw_writer", "series_raw", ["wid", "id"])
    # Retention deletes the buckets past each tier's age: without this it scanned the whole tier every run (the
    # primary key starts with step, then shop), seconds at 60,000 nodes after minutes, hopeless after a week. New
    # buckets are the newest, so the index grows at its end.
    op.create_index("ix_series_rollup_age", "series_rollup", ["step", "bucket"])
    bind = op.get_bind()
    last = bind.execute(sa.text("SELECT last_id FROM series_cursors WHERE step = 0")).scalar()
    bind.execute(
        sa.text("INSERT INTO series_writers (wid, instance, started_at, seen_at, minute_upto, hour_upto) "
                "VALUES (0, 'before 0018_series_writers', 0, 0, :c, :c)"),
        {"c": int(last or 0)},
    )
    if bind.dialect.name == "postgresql":  # the explicit wid 0 must not collide with the sequence's first value
        bind.execute(sa.text("SELECT setval(pg_get_serial_sequence('series_writers', 'wid'), 1, false)"))
    op.drop_table("series_cursors")


def downgrade() -> None:
    op.create_table(
        "series_cursors",
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("last_id", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("step", name="pk_series_cursors"),
    )
    op.drop_index("ix_series_rollup_age", table_name="series_rollup")
    op.drop_index("ix_series_raw_writer", table_name="series_raw")
    with op.batch_alter_table("series_raw") as batch:
        batch.drop_column("wid")
    op.drop_table("series_writers")
