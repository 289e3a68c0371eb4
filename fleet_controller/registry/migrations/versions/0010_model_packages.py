"""Model packages: the archives shops download, split into 1 MiB rows.

Revision ID: 0010_model_packages
Revises: 0002_releases
Create Date: 2026-11-29

On the releases branch: a release names a package stored here (fleet_controller/rollout/models_store.py).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010_model_packages"
down_revision = "0002_releases"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "model_packages",
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("archive_sha256", sa.String(64), nullable=False),
        sa.Column("archive_bytes", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("sha256", name="pk_model_packages"),
    )
    op.create_table(
        "model_chunks",
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("idx", sa.Integer(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("sha256", "idx", name="pk_model_chunks"),
    )


def downgrade() -> None:
    op.drop_table("model_chunks")
    op.drop_table("model_packages")
