"""Storage commitment: the storage_commitments table, delivery states committing and committed.

Revision ID: 0004_dicomweb
Revises: 0003_recall
Create Date: 2026-11-30

Written out in full rather than imported from storage.models (see 0001).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_dicomweb"
down_revision: str | None = "0003_recall"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_OLD_STATES = "state IN ('pending', 'sent', 'failed', 'cancelled')"
_NEW_STATES = "state IN ('pending', 'sent', 'committing', 'committed', 'failed', 'cancelled')"


def _utc() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "storage_commitments",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("transaction_uid", sa.String(length=64), nullable=False),
        sa.Column("peer_name", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("n_instances", sa.Integer(), nullable=False),
        sa.Column("n_failed", sa.Integer(), nullable=True),
        sa.Column("requested_at", _utc(), nullable=False),
        sa.Column("deadline", _utc(), nullable=False),
        sa.Column("answered_at", _utc(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.CheckConstraint(
            "state IN ('requested', 'committed', 'failed', 'expired')", name="ck_storage_commitments_state"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_storage_commitments"),
        sa.UniqueConstraint("transaction_uid", name="uq_storage_commitments_transaction_uid"),
    )
    op.create_index("ix_storage_commitments_state_deadline", "storage_commitments", ["state", "deadline"])
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_constraint("ck_deliveries_state", type_="check")
        batch.create_check_constraint("ck_deliveries_state", sa.text(_NEW_STATES))
        batch.add_column(sa.Column("commitment_id", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("committed_at", _utc(), nullable=True))
        batch.create_foreign_key(
            "fk_deliveries_commitment_id_storage_commitments", "storage_commitments", ["commitment_id"], ["id"]
        )
        batch.create_index("ix_deliveries_commitment_id", ["commitment_id"])


def downgrade() -> None:
    op.execute("UPDATE deliveries SET state = 'sent' WHERE state IN ('committing', 'committed')")
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_index("ix_deliveries_commitment_id")
        batch.drop_constraint("fk_deliveries_commitment_id_storage_commitments", type_="foreignkey")
        batch.drop_column("committed_at")
        batch.drop_column("commitment_id")
        batch.drop_constraint("ck_deliveries_state", type_="check")
        batch.create_check_constraint("ck_deliveries_state", sa.text(_OLD_STATES))
    op.drop_index("ix_storage_commitments_state_deadline", table_name="storage_commitments")
    op.drop_table("storage_commitments")
