"""Consistency gate: job state ``refused`` and the gate's score and method on each job.

Revision ID: 0002_gate
Revises: 0001
Create Date: 2026-11-30

Written out in full rather than imported from storage.models. The state CHECK constraint is
replaced in batch mode, which on SQLite copies the table (SQLite cannot alter a constraint).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_gate"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_OLD_STATES = "state IN ('queued', 'running', 'done', 'failed', 'waiting_model')"
_NEW_STATES = "state IN ('queued', 'running', 'done', 'failed', 'waiting_model', 'refused')"


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("consistency_score", sa.Float(), nullable=True))
        batch.add_column(sa.Column("consistency_method", sa.String(length=32), nullable=True))
        batch.drop_constraint("ck_jobs_state", type_="check")
        batch.create_check_constraint("ck_jobs_state", _NEW_STATES)


def downgrade() -> None:
    op.execute("UPDATE jobs SET state = 'failed' WHERE state = 'refused'")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_constraint("ck_jobs_state", type_="check")
        batch.create_check_constraint("ck_jobs_state", _OLD_STATES)
        batch.drop_column("consistency_method")
        batch.drop_column("consistency_score")
