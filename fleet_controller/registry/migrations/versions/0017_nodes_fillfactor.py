"""PostgreSQL: leave room on the ``nodes`` table's pages so a node's update stays on its page.

Revision ID: 0017_nodes_fillfactor
Revises: 0001_registry
Create Date: 2027-01-27

Every heartbeat updates its node's row. With the default fillfactor (100) a full page has no room
for the new row version, so PostgreSQL writes it to another page and updates every index of the
table too (primary key and presence): measured, 92 of 14,000 node updates were HOT (heap-only)
in bench/ingest.py's drain. With free room on each page the update stays on its page, touches
no index, and the old version is pruned in place. Applies to pages filled from now on (a VACUUM
FULL or pg_repack rewrites existing ones). SQLite has no such setting: nothing to do there.
"""

from __future__ import annotations

from alembic import op

revision = "0017_nodes_fillfactor"
down_revision = "0001_registry"
branch_labels = None
depends_on = None

NODES_FILLFACTOR = 50


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"ALTER TABLE nodes SET (fillfactor = {NODES_FILLFACTOR})")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE nodes RESET (fillfactor)")
