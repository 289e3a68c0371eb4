"""Intake partitions leased by controller replicas: ``intake_members`` and ``intake_leases``.

Revision ID: 0016_intake_leases
Revises: 0001_registry
Create Date: 2027-01-20

A branch of its own off the registry (like the other areas' revisions), so it never conflicts with
them. The tables are declared in ``fleet_controller.registry.leases``: replicas with
``intake.partitions`` set hold partitions of the shops by lease and subscribe to those shops only.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0016_intake_leases"
down_revision = "0001_registry"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "intake_members",
        sa.Column("replica", sa.String(128), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.Column("started_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("replica", name=op.f("pk_intake_members")),
    )
    op.create_table(
        "intake_leases",
        sa.Column("partition", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("owner", sa.String(128), nullable=True),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("acquired_at", sa.Float(), nullable=False),
        sa.Column("shops", sa.Integer(), nullable=False, server_default="0"),
        sa.PrimaryKeyConstraint("partition", name=op.f("pk_intake_leases")),
    )


def downgrade() -> None:
    op.drop_table("intake_leases")
    op.drop_table("intake_members")
