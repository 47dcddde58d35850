"""Provenance from end to end: from any instance UID to its whole chain, as plain values.

For a received instance the chain is: the association it came on, the instance, the jobs rules
queued for it, each job's outputs (derived instance, model, weights, settings) and each output's
deliveries. For a derived instance the same chain is found through its ``Output`` row. An output
withdrawn by ``dicomnode recall`` carries its recall id; the chain's ``recalls`` describe them, and
:func:`recall_of_note` answers for a rejection note's own UID. The result is a tree of frozen
dataclasses detached from the database; formatting is the CLI's job.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any, Literal, TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from storage.models import Association, Delivery, Instance, Job, Output, Recall


@dataclass(frozen=True)
class AssociationRecord:
    id: int
    calling_ae: str
    called_ae: str
    peer_host: str
    peer_port: int
    started_at: datetime
    ended_at: datetime | None
    accepted: bool
    reason: str | None
    n_instances: int


@dataclass(frozen=True)
class InstanceRecord:
    id: int
    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    modality: str | None
    body_part_examined: str | None
    view_position: str | None
    image_type: str | None
    synthetic: bool
    transfer_syntax_uid: str
    path: str
    sha256: str
    size_bytes: int
    received_at: datetime
    origin: str
    calling_ae: str | None
    called_ae: str | None
    peer_host: str | None


@dataclass(frozen=True)
class DeliveryRecord:
    id: int
    peer_name: str
    peer_ae: str
    peer_host: str
    peer_port: int
    state: str
    status_code: int | None
    attempts: int
    last_error: str | None
    not_before: datetime
    sent_at: datetime | None
    created_at: datetime


@dataclass(frozen=True)
class OutputRecord:
    id: int
    instance: InstanceRecord
    azimuth: float
    elevation: float
    seed: int
    model_name: str
    model_identity: str
    model_version: str | None
    steps: int
    guidance_scale: float
    sampler: str | None
    device: str | None
    dtype: str | None
    series_instance_uid: str
    created_at: datetime
    synthesis_s: float | None
    total_s: float | None
    deliveries: tuple[DeliveryRecord, ...]
    recall_id: int | None = None
    recalled_at: datetime | None = None


@dataclass(frozen=True)
class JobRecord:
    id: int
    rule_name: str
    state: str
    attempts: int
    max_attempts: int
    azimuths: tuple[float, ...]
    elevations: tuple[float, ...]
    destinations: tuple[str, ...]
    request_key: str
    not_before: datetime
    claimed_by: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    last_error: str | None
    consistency_score: float | None
    consistency_method: str | None
    outputs: tuple[OutputRecord, ...]


@dataclass(frozen=True)
class RecallRecord:
    """A recall: the rejection note (IHE IOCM KOS) that withdrew some outputs, and why, who, when."""

    id: int
    reason: str
    selector: str
    requested_by: str
    requested_at: datetime
    study_instance_uid: str
    note: InstanceRecord
    n_outputs: int
    recalled_uids: tuple[str, ...]
    note_deliveries: tuple[DeliveryRecord, ...]


@dataclass(frozen=True)
class ProvenanceChain:
    """The chain around ``queried_uid``, which is the ``input`` itself or one of its outputs."""

    queried_uid: str
    role: Literal["input", "output"]
    association: AssociationRecord | None
    input: InstanceRecord
    jobs: tuple[JobRecord, ...]
    recalls: tuple[RecallRecord, ...] = ()


R = TypeVar("R")


def _record(cls: type[R], row: Any, **given: Any) -> R:
    """A record of ``cls`` with every field not ``given`` copied from the same-named attribute."""
    values = {f.name: getattr(row, f.name) for f in fields(cls) if f.name not in given}  # type: ignore[arg-type]
    return cls(**values, **given)


def _recall_records(session: Session, recall_ids: set[int]) -> tuple[RecallRecord, ...]:
    records = []
    for recall in session.scalars(select(Recall).where(Recall.id.in_(sorted(recall_ids))).order_by(Recall.id)):
        uids = session.scalars(
            select(Instance.sop_instance_uid)
            .join(Output, Output.instance_id == Instance.id)
            .where(Output.recall_id == recall.id)
            .order_by(Output.id)
        )
        note_deliveries = session.scalars(
            select(Delivery).where(Delivery.output_instance_id == recall.note_instance_id).order_by(Delivery.id)
        )
        records.append(
            _record(
                RecallRecord,
                recall,
                note=_record(InstanceRecord, session.get_one(Instance, recall.note_instance_id)),
                recalled_uids=tuple(uids),
                note_deliveries=tuple(_record(DeliveryRecord, d) for d in note_deliveries),
            )
        )
    return tuple(records)


def recall_of_note(session: Session, sop_instance_uid: str) -> RecallRecord | None:
    """The recall whose rejection note has this SOP Instance UID, if it is one."""
    recall_id = session.scalars(
        select(Recall.id)
        .join(Instance, Recall.note_instance_id == Instance.id)
        .where(Instance.sop_instance_uid == sop_instance_uid)
    ).first()
    return _recall_records(session, {recall_id})[0] if recall_id is not None else None


def provenance_chain(session: Session, sop_instance_uid: str) -> ProvenanceChain | None:
    """The chain around the instance with this SOP Instance UID; None if it is not recorded."""
    instance = session.scalars(select(Instance).where(Instance.sop_instance_uid == sop_instance_uid)).first()
    if instance is None:
        return None
    produced_by = session.scalars(
        select(Output).where(Output.instance_id == instance.id).options(selectinload(Output.job))
    ).first()
    role: Literal["input", "output"] = "input"
    source = instance
    if produced_by is not None:
        role = "output"
        source = session.get_one(Instance, produced_by.job.input_instance_id)

    jobs = list(
        session.scalars(
            select(Job)
            .where(Job.input_instance_id == source.id)
            .order_by(Job.id)
            .options(selectinload(Job.outputs).selectinload(Output.instance))
        )
    )
    output_instance_ids = [o.instance_id for job in jobs for o in job.outputs]
    deliveries: dict[int, list[DeliveryRecord]] = defaultdict(list)
    if output_instance_ids:
        for delivery in session.scalars(
            select(Delivery).where(Delivery.output_instance_id.in_(output_instance_ids)).order_by(Delivery.id)
        ):
            deliveries[delivery.output_instance_id].append(_record(DeliveryRecord, delivery))

    association = session.get(Association, source.association_id) if source.association_id else None
    recall_ids = {o.recall_id for job in jobs for o in job.outputs if o.recall_id is not None}
    return ProvenanceChain(
        queried_uid=sop_instance_uid,
        role=role,
        association=_record(AssociationRecord, association) if association is not None else None,
        input=_record(InstanceRecord, source),
        jobs=tuple(
            _record(
                JobRecord,
                job,
                azimuths=tuple(job.azimuths),
                elevations=tuple(job.elevations),
                destinations=tuple(job.destinations),
                outputs=tuple(
                    _record(
                        OutputRecord,
                        output,
                        instance=_record(InstanceRecord, output.instance),
                        deliveries=tuple(deliveries[output.instance_id]),
                    )
                    for output in job.outputs
                ),
            )
            for job in jobs
        ),
        recalls=_recall_records(session, recall_ids),
    )
