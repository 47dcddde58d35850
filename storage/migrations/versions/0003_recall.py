"""Recalls (IHE IOCM rejection notes): a recalls table, recall marks on outputs, cancelled deliveries.

Revision ID: 0003_recall
Revises: 0002_gate
Create Date: 2026-11-30

Written out in full rather than imported from storage.models, so that this revision keeps
creating exactly this schema whatever the models become later.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_recall"
down_revision: str | None = "0002_gate"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_OLD_DELIVERY_STATES = "state IN ('pending', 'sent', 'failed')"
_NEW_DELIVERY_STATES = "state IN ('pending', 'sent', 'failed', 'cancelled')"


def _utc() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "recalls",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("reason", sa.String(length=16), nullable=False),
        sa.Column("selector", sa.String(length=255), nullable=False),
        sa.Column("requested_by", sa.String(length=128), nullable=False),
        sa.Column("requested_at", _utc(), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("note_instance_id", sa.Integer(), nullable=False),
        sa.Column("n_outputs", sa.Integer(), nullable=False),
        sa.CheckConstraint("reason IN ('quality', 'safety')", name="ck_recalls_reason"),
        sa.ForeignKeyConstraint(
            ["note_instance_id"], ["instances.id"], name="fk_recalls_note_instance_id_instances"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_recalls"),
        sa.UniqueConstraint("note_instance_id", name="uq_recalls_note_instance_id"),
    )
    op.create_index("ix_recalls_study_instance_uid", "recalls", ["study_instance_uid"])

    with op.batch_alter_table("outputs") as batch:
        batch.add_column(sa.Column("recall_id", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("recalled_at", _utc(), nullable=True))
        batch.create_foreign_key("fk_outputs_recall_id_recalls", "recalls", ["recall_id"], ["id"])
        batch.create_index("ix_outputs_recall_id", ["recall_id"])

    with op.batch_alter_table("deliveries") as batch:
        batch.drop_constraint("ck_deliveries_state", type_="check")
        batch.create_check_constraint("ck_deliveries_state", _NEW_DELIVERY_STATES)


def downgrade() -> None:
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_constraint("ck_deliveries_state", type_="check")
        batch.create_check_constraint("ck_deliveries_state", _OLD_DELIVERY_STATES)
    with op.batch_alter_table("outputs") as batch:
        batch.drop_index("ix_outputs_recall_id")
        batch.drop_constraint("fk_outputs_recall_id_recalls", type_="foreignkey")
        batch.drop_column("recalled_at")
        batch.drop_column("recall_id")
    op.drop_index("ix_recalls_study_instance_uid", table_name="recalls")
    op.drop_table("recalls")
