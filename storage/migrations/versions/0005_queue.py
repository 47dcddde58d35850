"""The leased queue: priority, lease and fencing token on jobs and deliveries; worker heartbeats.

Revision ID: 0005_queue
Revises: 0004_dicomweb
Create Date: 2026-11-30

Written out in full rather than imported from storage.models (see 0001).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_queue"
down_revision: str | None = "0004_dicomweb"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _utc() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def _lease_columns() -> list[sa.Column]:
    return [
        sa.Column("priority", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("lease_token", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("lease_expires_at", _utc(), nullable=True),
        sa.Column("heartbeat_at", _utc(), nullable=True),
    ]


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        for column in _lease_columns():
            batch.add_column(column)
    with op.batch_alter_table("deliveries") as batch:
        for column in _lease_columns():
            batch.add_column(column)
        batch.add_column(sa.Column("claimed_by", sa.String(length=128), nullable=True))
        batch.add_column(sa.Column("claimed_at", _utc(), nullable=True))
    op.create_table(
        "queue_workers",
        sa.Column("worker_id", sa.String(length=128), nullable=False),
        sa.Column("node", sa.String(length=128), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("started_at", _utc(), nullable=False),
        sa.Column("heartbeat_at", _utc(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=True),
        sa.Column("stopped_at", _utc(), nullable=True),
        sa.PrimaryKeyConstraint("worker_id", name="pk_queue_workers"),
    )


def downgrade() -> None:
    op.drop_table("queue_workers")
    with op.batch_alter_table("deliveries") as batch:
        for name in ("claimed_at", "claimed_by", "heartbeat_at", "lease_expires_at", "lease_token", "priority"):
            batch.drop_column(name)
    with op.batch_alter_table("jobs") as batch:
        for name in ("heartbeat_at", "lease_expires_at", "lease_token", "priority"):
            batch.drop_column(name)
