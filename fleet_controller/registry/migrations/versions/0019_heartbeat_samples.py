"""A heartbeat's series samples in its heartbeat row; ``series_raw`` keeps telemetry only; the roll-up's cursors per table.

Revision ID: 0019_heartbeat_samples
Revises: 0018_series_writers
Create Date: 2027-02-09

Every heartbeat wrote a ``series_raw`` row besides its ``heartbeats`` row, and each of the two
tables has an index keyed by shop or node: a page at a scattered place per message for each
(issue #15: ~9 KB of the ~25 KB written per heartbeat at 100,000 nodes, docs/benchmarks.md).
Now the heartbeat row carries its samples (``heartbeats.samples``) and names its writer
(``heartbeats.wid``, indexed with the id: a writer's rows are appended at the end of that
index), and ``series_writers`` holds a writer's cursors in the heartbeat ids beside those in the
raw ids (``minute_upto_hb``, ``hour_upto_hb``, ``pending_upto_hb``).

Data already stored stays where it is: heartbeat rows of before have no samples (NULL), their
samples are in ``series_raw`` (until they age out) and reads take the raw tier from both tables.
Existing writers' heartbeat cursors start at the highest heartbeat id: nothing of before is
folded again from ``heartbeats``.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0019_heartbeat_samples"
down_revision = "0018_series_writers"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("heartbeats", sa.Column("samples", sa.Text(), nullable=True))
    op.add_column("heartbeats", sa.Column("wid", sa.BigInteger(), nullable=False, server_default="0"))
    op.create_index("ix_heartbeats_writer", "heartbeats", ["wid", "id"])
    for name in ("minute_upto_hb", "hour_upto_hb", "pending_upto_hb"):
        op.add_column("series_writers", sa.Column(name, sa.BigInteger(), nullable=False, server_default="0"))
    bind = op.get_bind()
    last = int(bind.execute(sa.text("SELECT max(id) FROM heartbeats")).scalar() or 0)
    bind.execute(sa.text("UPDATE series_writers SET minute_upto_hb = :c, hour_upto_hb = :c"), {"c": last})


def downgrade() -> None:
    # The samples of heartbeats go back to series_raw (the raw tier of before), as rows of writer 0; a writer that dies
    # across the downgrade is not recovered for what it held of them.
    op.execute("INSERT INTO series_raw (shop_id, node_id, ts, samples, wid) "
               "SELECT shop_id, node_id, ts, samples, 0 FROM heartbeats WHERE samples IS NOT NULL ORDER BY id")
    with op.batch_alter_table("series_writers") as batch:
        for name in ("pending_upto_hb", "hour_upto_hb", "minute_upto_hb"):
            batch.drop_column(name)
    op.drop_index("ix_heartbeats_writer", table_name="heartbeats")
    with op.batch_alter_table("heartbeats") as batch:
        batch.drop_column("wid")
        batch.drop_column("samples")
