"""Recall (IHE IOCM): withdraw derived outputs with a rejection note, everywhere they were sent.

``dicomnode recall`` chooses outputs by model identity, job or series; :func:`plan_recall` groups
those not yet recalled by study and finds, for each study, every peer that acknowledged one of
them (a ``sent`` delivery) or may hold one without having said so (a delivery with at least one
attempt: a timeout can follow a completed store). A note about instances a peer never got is
harmless; an unwithdrawn instance is not. :func:`execute_recall` then, per study and in one transaction: writes
the rejection note (:mod:`dicomnode.rejection_note`) to the store and records it, records the
recall (reason, selector, who, when) and marks the outputs recalled, cancels their undelivered
deliveries, and queues a delivery of the note to each of those peers. The node's delivery loop
sends the note; nothing ever sends a recalled output again (``storage.deliveries`` refuses).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Literal

import pydicom
from pydicom.errors import InvalidDicomError
from sqlalchemy import or_, select
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.errors import RecallError, StorageError
from dicomnode.rejection_note import DEFAULT_SERIES_NUMBER, REJECTION_TITLES, RecallReason, build_rejection_note
from storage.deliveries import DeliveryTarget, create_deliveries
from storage.instances import fields_from_dataset, find_instance, record_instance
from storage.models import Delivery, Instance, Output
from storage.recalls import record_recall
from storage.store import InstanceStore

logger = logging.getLogger(__name__)

SelectorKind = Literal["model", "job", "series"]
_MIN_IDENTITY_PREFIX = 12  # as many hex digits as the model version the node writes


@dataclass(frozen=True)
class RecallSelector:
    """How the operator names the outputs to recall: a model identity (or a prefix of at least
    12 hex digits), a job id, or a derived Series Instance UID."""

    kind: SelectorKind
    value: str

    def __post_init__(self) -> None:
        value = self.value.strip()
        if self.kind == "model" and len(value) < _MIN_IDENTITY_PREFIX:
            raise RecallError(f"model identity {value!r}: give the digest or at least its first 12 hex digits")
        if self.kind == "job" and not value.isdigit():
            raise RecallError(f"job id {value!r} is not a number")
        if self.kind == "series" and not value:
            raise RecallError("series UID is empty")
        object.__setattr__(self, "value", value)

    def __str__(self) -> str:
        return f"{self.kind} {self.value}"


@dataclass(frozen=True)
class StudyRecall:
    """What recalling one study's outputs means: which outputs, their instances, and who gets the note."""

    study_instance_uid: str
    output_ids: tuple[int, ...]
    sop_instance_uids: tuple[str, ...]
    paths: tuple[str, ...]
    targets: tuple[DeliveryTarget, ...]


@dataclass(frozen=True)
class RecallPlan:
    selector: RecallSelector
    reason: RecallReason
    studies: tuple[StudyRecall, ...]
    already_recalled: tuple[str, ...]  # SOP Instance UIDs the selector matched that a recall already withdrew


@dataclass(frozen=True)
class RecallDone:
    """One study recalled: the recall row, the note's SOP Instance UID, and the peers it goes to."""

    recall_id: int
    study_instance_uid: str
    note_sop_instance_uid: str
    n_outputs: int
    peers: tuple[str, ...]


def _selected_outputs(session: Session, selector: RecallSelector) -> list[tuple[Output, Instance]]:
    query = select(Output, Instance).join(Instance, Output.instance_id == Instance.id).order_by(Output.id)
    if selector.kind == "model":
        query = query.where(Output.model_identity.startswith(selector.value, autoescape=True))
    elif selector.kind == "job":
        query = query.where(Output.job_id == int(selector.value))
    else:
        query = query.where(Output.series_instance_uid == selector.value)
    return [(output, instance) for output, instance in session.execute(query)]


def plan_recall(session: Session, selector: RecallSelector, reason: RecallReason) -> RecallPlan:
    """What a recall would do; reads only. ``RecallError`` when the selector matches no output."""
    if reason not in REJECTION_TITLES:
        raise RecallError(f"reason {reason!r} is not one of {', '.join(REJECTION_TITLES)}")
    selected = _selected_outputs(session, selector)
    if not selected:
        raise RecallError(f"no derived output matches {selector}")
    already = tuple(instance.sop_instance_uid for output, instance in selected if output.recall_id is not None)
    by_study: dict[str, list[tuple[Output, Instance]]] = defaultdict(list)
    for output, instance in selected:
        if output.recall_id is None:
            by_study[instance.study_instance_uid].append((output, instance))
    studies = []
    for study_uid, pairs in sorted(by_study.items()):
        instance_ids = [instance.id for _, instance in pairs]
        acknowledged = session.scalars(
            select(Delivery)
            .where(
                Delivery.output_instance_id.in_(instance_ids),
                or_(Delivery.state == "sent", Delivery.attempts > 0),
            )
            .order_by(Delivery.peer_name, Delivery.id)
        )
        targets: dict[str, DeliveryTarget] = {}
        for d in acknowledged:
            targets.setdefault(d.peer_name, DeliveryTarget(d.peer_name, d.peer_ae, d.peer_host, d.peer_port))
        studies.append(
            StudyRecall(
                study_instance_uid=study_uid,
                output_ids=tuple(output.id for output, _ in pairs),
                sop_instance_uids=tuple(instance.sop_instance_uid for _, instance in pairs),
                paths=tuple(instance.path for _, instance in pairs),
                targets=tuple(targets.values()),
            )
        )
    return RecallPlan(selector=selector, reason=reason, studies=tuple(studies), already_recalled=already)


def _read_outputs(store: InstanceStore, study: StudyRecall) -> list[pydicom.Dataset]:
    datasets: list[pydicom.Dataset] = []
    for path, uid in zip(study.paths, study.sop_instance_uids, strict=True):
        try:
            datasets.append(pydicom.dcmread(store.absolute(path), stop_before_pixels=True))
        except (OSError, InvalidDicomError) as e:
            raise RecallError(f"cannot read output {uid} at {path}: {e}") from e
    return datasets


def execute_recall(
    sessions: sessionmaker[Session],
    store: InstanceStore,
    plan: RecallPlan,
    *,
    requested_by: str,
    manufacturer: str,
    series_number: int = DEFAULT_SERIES_NUMBER,
) -> list[RecallDone]:
    """Carry out `plan`, one study per transaction (see the module docstring)."""
    done: list[RecallDone] = []
    for study in plan.studies:
        datasets = _read_outputs(store, study)
        description = (
            f"{len(datasets)} synthetic outputs recalled ({plan.reason}) by {requested_by}, selected by "
            f"{plan.selector}; they must not be used."
        )
        note = build_rejection_note(
            datasets, plan.reason, manufacturer=manufacturer, description=description, series_number=series_number
        )
        with sessions.begin() as session:
            row = find_instance(session, note.SOPInstanceUID)
            if row is None:  # the same set recalled for the same reason always gives this note
                stored = store.write_dataset(note)
                fields = fields_from_dataset(note)
                fields.update(path=stored.path, sha256=stored.sha256, size_bytes=stored.size_bytes)
                row = record_instance(session, origin="derived", **fields)
            try:
                recall = record_recall(
                    session,
                    reason=plan.reason,
                    selector=str(plan.selector),
                    requested_by=requested_by,
                    study_instance_uid=study.study_instance_uid,
                    note_instance_id=row.id,
                    output_ids=study.output_ids,
                )
            except StorageError as e:
                study_uid = study.study_instance_uid
                raise RecallError(f"study {study_uid}: {e} (did another recall run at the same time?)") from e
            create_deliveries(session, row.id, study.targets)
            done.append(
                RecallDone(
                    recall_id=recall.id,
                    study_instance_uid=study.study_instance_uid,
                    note_sop_instance_uid=str(note.SOPInstanceUID),
                    n_outputs=len(study.output_ids),
                    peers=tuple(t.peer_name for t in study.targets),
                )
            )
        logger.info(
            "recall %d: rejection note %s for %d outputs, queued to %s",
            recall.id,
            note.SOPInstanceUID,
            len(study.output_ids),
            ", ".join(t.peer_name for t in study.targets) or "no peer",
        )
    return done
