"""Initial schema: associations, instances, jobs, outputs, deliveries.

Revision ID: 0001
Revises:
Create Date: 2026-01-01

Written out in full rather than imported from storage.models, so that this revision keeps
creating exactly this schema whatever the models become later.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _utc() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "associations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("calling_ae", sa.String(length=16), nullable=False),
        sa.Column("called_ae", sa.String(length=16), nullable=False),
        sa.Column("peer_host", sa.String(length=255), nullable=False),
        sa.Column("peer_port", sa.Integer(), nullable=False),
        sa.Column("started_at", _utc(), nullable=False),
        sa.Column("ended_at", _utc(), nullable=True),
        sa.Column("accepted", sa.Boolean(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("n_instances", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_associations"),
    )
    op.create_index("ix_associations_started_at", "associations", ["started_at"])

    op.create_table(
        "instances",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("sop_class_uid", sa.String(length=64), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("series_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("modality", sa.String(length=16), nullable=True),
        sa.Column("body_part_examined", sa.String(length=64), nullable=True),
        sa.Column("view_position", sa.String(length=16), nullable=True),
        sa.Column("image_type", sa.Text(), nullable=True),
        sa.Column("synthetic", sa.Boolean(), nullable=False),
        sa.Column("transfer_syntax_uid", sa.String(length=64), nullable=False),
        sa.Column("path", sa.String(length=1024), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("received_at", _utc(), nullable=False),
        sa.Column("association_id", sa.Integer(), nullable=True),
        sa.Column("origin", sa.String(length=16), nullable=False),
        sa.Column("calling_ae", sa.String(length=16), nullable=True),
        sa.Column("called_ae", sa.String(length=16), nullable=True),
        sa.Column("peer_host", sa.String(length=255), nullable=True),
        sa.CheckConstraint("origin IN ('received', 'derived')", name="ck_instances_origin"),
        sa.ForeignKeyConstraint(
            ["association_id"], ["associations.id"], name="fk_instances_association_id_associations"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_instances"),
        sa.UniqueConstraint("path", name="uq_instances_path"),
        sa.UniqueConstraint("sop_instance_uid", name="uq_instances_sop_instance_uid"),
    )
    op.create_index("ix_instances_association_id", "instances", ["association_id"])
    op.create_index("ix_instances_received_at", "instances", ["received_at"])
    op.create_index("ix_instances_series_instance_uid", "instances", ["series_instance_uid"])
    op.create_index("ix_instances_study_instance_uid", "instances", ["study_instance_uid"])

    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("input_instance_id", sa.Integer(), nullable=False),
        sa.Column("rule_name", sa.String(length=64), nullable=False),
        sa.Column("azimuths", sa.JSON(), nullable=False),
        sa.Column("elevations", sa.JSON(), nullable=False),
        sa.Column("destinations", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("not_before", _utc(), nullable=False),
        sa.Column("claimed_by", sa.String(length=128), nullable=True),
        sa.Column("claimed_at", _utc(), nullable=True),
        sa.Column("started_at", _utc(), nullable=True),
        sa.Column("finished_at", _utc(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", _utc(), nullable=False),
        sa.Column("request_key", sa.String(length=128), nullable=False),
        sa.CheckConstraint("state IN ('queued', 'running', 'done', 'failed', 'waiting_model')", name="ck_jobs_state"),
        sa.ForeignKeyConstraint(["input_instance_id"], ["instances.id"], name="fk_jobs_input_instance_id_instances"),
        sa.PrimaryKeyConstraint("id", name="pk_jobs"),
        sa.UniqueConstraint("request_key", name="uq_jobs_request_key"),
    )
    op.create_index("ix_jobs_input_instance_id", "jobs", ["input_instance_id"])
    op.create_index("ix_jobs_state_not_before", "jobs", ["state", "not_before"])

    op.create_table(
        "outputs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("instance_id", sa.Integer(), nullable=False),
        sa.Column("azimuth", sa.Float(), nullable=False),
        sa.Column("elevation", sa.Float(), nullable=False),
        sa.Column("seed", sa.BigInteger(), nullable=False),
        sa.Column("model_name", sa.String(length=128), nullable=False),
        sa.Column("model_identity", sa.String(length=128), nullable=False),
        sa.Column("model_version", sa.String(length=64), nullable=True),
        sa.Column("steps", sa.Integer(), nullable=False),
        sa.Column("guidance_scale", sa.Float(), nullable=False),
        sa.Column("sampler", sa.String(length=64), nullable=True),
        sa.Column("device", sa.String(length=64), nullable=True),
        sa.Column("dtype", sa.String(length=32), nullable=True),
        sa.Column("series_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("created_at", _utc(), nullable=False),
        sa.Column("synthesis_s", sa.Float(), nullable=True),
        sa.Column("total_s", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(["instance_id"], ["instances.id"], name="fk_outputs_instance_id_instances"),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name="fk_outputs_job_id_jobs"),
        sa.PrimaryKeyConstraint("id", name="pk_outputs"),
        sa.UniqueConstraint("instance_id", name="uq_outputs_instance_id"),
    )
    op.create_index("ix_outputs_job_id", "outputs", ["job_id"])
    op.create_index("ix_outputs_series_instance_uid", "outputs", ["series_instance_uid"])

    op.create_table(
        "deliveries",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("output_instance_id", sa.Integer(), nullable=False),
        sa.Column("peer_name", sa.String(length=64), nullable=False),
        sa.Column("peer_ae", sa.String(length=16), nullable=False),
        sa.Column("peer_host", sa.String(length=255), nullable=False),
        sa.Column("peer_port", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("not_before", _utc(), nullable=False),
        sa.Column("sent_at", _utc(), nullable=True),
        sa.Column("created_at", _utc(), nullable=False),
        sa.CheckConstraint("state IN ('pending', 'sent', 'failed')", name="ck_deliveries_state"),
        sa.ForeignKeyConstraint(
            ["output_instance_id"], ["instances.id"], name="fk_deliveries_output_instance_id_instances"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_deliveries"),
        sa.UniqueConstraint("output_instance_id", "peer_name", name="uq_deliveries_output_instance_id_peer_name"),
    )
    op.create_index("ix_deliveries_state_not_before", "deliveries", ["state", "not_before"])


def downgrade() -> None:
    for table in ("deliveries", "outputs", "jobs", "instances", "associations"):
        op.drop_table(table)
