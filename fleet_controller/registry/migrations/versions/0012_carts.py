"""Carts and the review queue: carts, cart_lines, cart_actions (the audit trail).

Revision ID: 0012_carts
Revises: 0001_registry
Create Date: 2026-11-29

A branch of its own off the registry (like releases and accounts), so it never conflicts with
revisions other areas add; the tables are declared in ``fleet_controller.registry.carts``.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012_carts"
down_revision = "0001_registry"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "carts",
        sa.Column("cart_id", sa.String(128), nullable=False),
        sa.Column("shop_id", sa.String(63), nullable=False),
        sa.Column("node_id", sa.String(63), nullable=False),
        sa.Column("origin", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("corrected", sa.Boolean(), nullable=False),
        sa.Column("sessions", sa.JSON(), nullable=False),
        sa.Column("shopper", sa.String(128), nullable=False),
        sa.Column("opened_at", sa.Float(), nullable=False),
        sa.Column("closed_at", sa.Float(), nullable=False),
        sa.Column("confidence", sa.Float(), nullable=False),
        sa.Column("reasons", sa.JSON(), nullable=False),
        sa.Column("attributions", sa.JSON(), nullable=False),
        sa.Column("original", sa.JSON(), nullable=False),
        sa.Column("received_at", sa.Float(), nullable=False),
        sa.Column("reviewed_by", sa.String(64), nullable=False),
        sa.Column("reviewed_at", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("cart_id", name="pk_carts"),
    )
    op.create_index("ix_carts_shop_status", "carts", ["shop_id", "status"])
    op.create_index("ix_carts_received_at", "carts", ["received_at"])
    op.create_table(
        "cart_lines",
        sa.Column("cart_id", sa.String(128), nullable=False),
        sa.Column("product", sa.String(128), nullable=False),
        sa.Column("quantity", sa.Integer(), nullable=False),
        sa.Column("unit_price_cents", sa.Integer(), nullable=False),
        sa.Column("confidence", sa.Float(), nullable=False),
        sa.Column("evidence", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("cart_id", "product", name="pk_cart_lines"),
    )
    op.create_table(
        "cart_actions",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("cart_id", sa.String(128), nullable=False),
        sa.Column("shop_id", sa.String(63), nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("actor", sa.String(64), nullable=False),
        sa.Column("remote", sa.String(128), nullable=False),
        sa.Column("at", sa.Float(), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_cart_actions"),
    )
    op.create_index("ix_cart_actions_cart_id", "cart_actions", ["cart_id"])


def downgrade() -> None:
    op.drop_table("cart_actions")
    op.drop_table("cart_lines")
    op.drop_table("carts")
