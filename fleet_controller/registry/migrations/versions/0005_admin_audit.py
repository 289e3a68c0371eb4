"""Admin and audit: the audit log, shop maintenance, remote actions, command counters, disabled users.

Revision ID: 0005_admin_audit
Revises: 0001_registry
Create Date: 2026-11-29

A branch of its own off the registry, like releases, accounts and trust. It adds a column to
``users`` (created by ``0003_accounts``), so it depends on that revision.

* ``audit_log``: every action by anyone (``fleet_controller.registry.audit``).
* ``shop_maintenance``, ``remote_actions``, ``command_counters``: remote actions and the
  counters of signed commands (``fleet_controller.registry.maintenance``).
* ``users.disabled_at``: a disabled user cannot log in; their sessions and tokens stop working.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_admin_audit"
down_revision = "0001_registry"
branch_labels = None
depends_on = "0003_accounts"


def upgrade() -> None:
    op.create_table(
        "audit_log",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("at", sa.Float(), nullable=False),
        sa.Column("actor", sa.String(64), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("target", sa.String(200), nullable=False),
        sa.Column("shop_id", sa.String(63), nullable=True),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.Column("source_address", sa.String(64), nullable=False),
        sa.Column("via", sa.String(16), nullable=False),
        sa.Column("outcome", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_audit_log"),
    )
    for col in ("at", "actor", "action", "shop_id"):
        op.create_index(f"ix_audit_log_{col}", "audit_log", [col])
    op.create_table(
        "shop_maintenance",
        sa.Column("shop_id", sa.String(63), nullable=False),
        sa.Column("since", sa.Float(), nullable=False),
        sa.Column("until", sa.Float(), nullable=True),
        sa.Column("by", sa.String(64), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("shop_id", name="pk_shop_maintenance"),
    )
    op.create_table(
        "remote_actions",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("shop_id", sa.String(63), nullable=False),
        sa.Column("node_id", sa.String(63), nullable=True),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("args", sa.JSON(), nullable=False),
        sa.Column("correlation_id", sa.String(64), nullable=True),
        sa.Column("revision", sa.Integer(), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("requested_by", sa.String(64), nullable=False),
        sa.Column("requested_at", sa.Float(), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=True),
        sa.Column("finished_at", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_remote_actions"),
        sa.UniqueConstraint("correlation_id", name="uq_remote_actions_correlation_id"),
    )
    op.create_index("ix_remote_actions_shop_id", "remote_actions", ["shop_id"])
    op.create_table(
        "command_counters",
        sa.Column("shop_id", sa.String(63), nullable=False),
        sa.Column("node_id", sa.String(63), nullable=False),
        sa.Column("counter", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("shop_id", "node_id", name="pk_command_counters"),
    )
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("disabled_at", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.drop_column("disabled_at")
    op.drop_table("command_counters")
    op.drop_table("remote_actions")
    op.drop_table("shop_maintenance")
    op.drop_table("audit_log")
