"""Exact intake across replicas: a revision on every node's sequence cursor, and evicted counts.

Revision ID: 0015_exact_intake
Revises: 0001_registry
Create Date: 2027-01-10

A branch of its own off the registry (like the other areas' revisions), so it never conflicts with them.

* ``nodes.cursor_rev``: bumped by every write of the node's cursor (epoch, watermark, gaps). A
  writer updates the cursor only where the revision is still the one it read (compare-and-set),
  so two controller replicas sharing the database can never both store the same (epoch, seq),
  nor count a gap the other replica has already filled.
* ``nodes.evicted_total``: seqs the node reported its outbox evicted unsent (counted apart from
  ``missing_total``).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0015_exact_intake"
down_revision = "0001_registry"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("nodes") as batch:
        batch.add_column(sa.Column("cursor_rev", sa.BigInteger(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("evicted_total", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("nodes") as batch:
        batch.drop_column("evicted_total")
        batch.drop_column("cursor_rev")
