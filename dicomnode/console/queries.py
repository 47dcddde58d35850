"""Small read functions over the provenance database for the console's pages, API and metrics.

Each returns plain dicts and lists (JSON-ready once datetimes are formatted) and shows states as
whatever strings the database holds, so new job or delivery states appear without code changes.
Optional columns that other parts of the node may add (a job's ``consistency_score`` and
``refusal_reason``) are read when the model has them.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pydicom
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from storage.models import Association, Delivery, Instance, Job, Output, utcnow
from storage.provenance import provenance_chain
from storage.store import InstanceStore

OPTIONAL_JOB_COLUMNS = ("consistency_score", "refusal_reason")
HEADER_KEYWORDS = ("PatientName", "PatientID", "StudyDate", "StudyDescription", "AccessionNumber")


def counts_by_state(session: Session, column: Any) -> dict[str, int]:
    """``{state: count}`` of the table that ``column`` (e.g. ``Job.state``) belongs to."""
    rows = session.execute(select(column, func.count()).group_by(column)).all()
    return {str(state): int(n) for state, n in rows}


def last_24h(session: Session, now: datetime | None = None) -> dict[str, int]:
    """How much happened in the last 24 hours: received, synthesised, delivered, failed."""
    since = (now or utcnow()) - timedelta(hours=24)

    def count(query: Any) -> int:
        return int(session.scalar(query) or 0)

    return {
        "received": count(
            select(func.count())
            .select_from(Instance)
            .where(Instance.origin == "received", Instance.received_at >= since)
        ),
        "jobs_finished": count(select(func.count()).select_from(Job).where(Job.finished_at >= since)),
        "jobs_failed": count(
            select(func.count()).select_from(Job).where(Job.state == "failed", Job.finished_at >= since)
        ),
        "views_synthesised": count(select(func.count()).select_from(Output).where(Output.created_at >= since)),
        "deliveries_sent": count(
            select(func.count()).select_from(Delivery).where(Delivery.state == "sent", Delivery.sent_at >= since)
        ),
        "associations": count(select(func.count()).select_from(Association).where(Association.started_at >= since)),
    }


def recent_errors(session: Session, limit: int = 10) -> list[dict[str, Any]]:
    """The newest job and delivery errors, newest first."""
    jobs = session.execute(
        select(Job.id, Job.state, Job.last_error, Job.finished_at, Job.created_at)
        .where(Job.last_error.is_not(None))
        .order_by(Job.id.desc())
        .limit(limit)
    ).all()
    deliveries = session.execute(
        select(Delivery.id, Delivery.state, Delivery.last_error, Delivery.peer_name, Delivery.created_at)
        .where(Delivery.last_error.is_not(None))
        .order_by(Delivery.id.desc())
        .limit(limit)
    ).all()
    errors = [
        {"kind": "job", "id": r.id, "state": r.state, "error": r.last_error, "at": r.finished_at or r.created_at}
        for r in jobs
    ] + [
        {
            "kind": "delivery",
            "id": r.id,
            "state": r.state,
            "error": r.last_error,
            "peer": r.peer_name,
            "at": r.created_at,
        }
        for r in deliveries
    ]
    return sorted(errors, key=lambda e: e["at"], reverse=True)[:limit]


def latest_model_identity(session: Session) -> str | None:
    """The identity of the model that made the newest output, if any output exists."""
    return session.scalar(select(Output.model_identity).order_by(Output.id.desc()).limit(1))


def workers(session: Session, lease_s: float, now: datetime | None = None) -> list[dict[str, Any]]:
    """Every node process and synthesis worker sharing the database, from its heartbeat row.

    ``alive``: not stopped and a heartbeat within ``lease_s`` (after that its leases run out and
    its work is reclaimed by others). ``job_id``: the job its last heartbeat named, while running.
    """
    from storage.heartbeats import list_workers

    now = now or utcnow()
    found = list_workers(session)
    held = [w.job_id for w in found if w.job_id is not None]
    running = set(session.scalars(select(Job.id).where(Job.id.in_(held), Job.state == "running"))) if held else set()
    rows = []
    for w in found:
        age = (now - w.heartbeat_at).total_seconds()
        rows.append(
            {
                "id": w.worker_id,
                "node": w.node,
                "role": w.role,
                "host": w.host,
                "pid": w.pid,
                "started_at": w.started_at,
                "heartbeat_at": w.heartbeat_at,
                "heartbeat_age_s": round(age, 1),
                "job_id": w.job_id if w.stopped_at is None and w.job_id in running else None,
                "stopped_at": w.stopped_at,
                "alive": w.stopped_at is None and age <= lease_s,
            }
        )
    return rows


def _optional(job: Job) -> dict[str, Any]:
    return {name: getattr(job, name, None) for name in OPTIONAL_JOB_COLUMNS}


def _instance(instance: Instance) -> dict[str, Any]:
    return {
        "id": instance.id,
        "sop_instance_uid": instance.sop_instance_uid,
        "study_instance_uid": instance.study_instance_uid,
        "series_instance_uid": instance.series_instance_uid,
        "sop_class_uid": instance.sop_class_uid,
        "modality": instance.modality,
        "body_part_examined": instance.body_part_examined,
        "view_position": instance.view_position,
        "received_at": instance.received_at,
        "calling_ae": instance.calling_ae,
        "origin": instance.origin,
        "size_bytes": instance.size_bytes,
    }


NO_JOB = "not processed"  # the state shown for a received input no rule took


def studies(
    session: Session,
    *,
    state: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = 50,
) -> list[dict[str, Any]]:
    """Received inputs newest first: one row per job (rule, state, optional score, views), or one row
    in state :data:`NO_JOB` for an input no rule took (no match, or loop prevention).

    ``state`` filters on the job state (or :data:`NO_JOB`); ``since``/``until`` on the time received.
    """
    query = select(Instance).where(Instance.origin == "received").order_by(Instance.id.desc()).limit(limit)
    has_job = select(Job.id).where(Job.input_instance_id == Instance.id)
    if state == NO_JOB:
        query = query.where(~has_job.exists())
    elif state:
        query = query.where(has_job.where(Job.state == state).exists())
    if since is not None:
        query = query.where(Instance.received_at >= since)
    if until is not None:
        query = query.where(Instance.received_at < until)
    rows = []
    for instance in session.scalars(query):
        jobs = [job for job in instance.jobs if not state or state == NO_JOB or job.state == state]
        if not jobs:
            rows.append(
                {"job_id": None, "rule": None, "state": NO_JOB, "input": _instance(instance), "views": []}
                | dict.fromkeys(("attempts", "created_at", "finished_at", "last_error", *OPTIONAL_JOB_COLUMNS))
            )
        for job in reversed(jobs):
            outputs = session.execute(
                select(Output.instance_id, Output.azimuth, Output.elevation)
                .where(Output.job_id == job.id)
                .order_by(Output.id)
            ).all()
            rows.append(
                {
                    "job_id": job.id,
                    "rule": job.rule_name,
                    "state": job.state,
                    "attempts": job.attempts,
                    "created_at": job.created_at,
                    "finished_at": job.finished_at,
                    "last_error": job.last_error,
                    **_optional(job),
                    "input": _instance(instance),
                    "views": [
                        {"instance_id": o.instance_id, "azimuth": o.azimuth, "elevation": o.elevation}
                        for o in outputs
                    ],
                }
            )
    return rows


def job_states(session: Session) -> list[str]:
    """Every job state present in the database, and :data:`NO_JOB` (for filters)."""
    return sorted(str(s) for s in session.scalars(select(Job.state).distinct())) + [NO_JOB]


def job_detail(session: Session, job_id: int) -> dict[str, Any] | None:
    """One job with its whole provenance chain (association -> input -> job -> outputs -> deliveries)."""
    job = session.get(Job, job_id)
    if job is None:
        return None
    chain = provenance_chain(session, job.input_instance.sop_instance_uid)
    assert chain is not None
    record = next(j for j in chain.jobs if j.id == job_id)
    timings = {
        "queued_s": _seconds(job.created_at, job.started_at),
        "running_s": _seconds(job.started_at, job.finished_at),
        "total_s": _seconds(job.created_at, job.finished_at),
    }
    return {
        "job": {**dataclasses.asdict(record), **_optional(job)},
        "association": dataclasses.asdict(chain.association) if chain.association else None,
        "input": dataclasses.asdict(chain.input),
        "timings": timings,
    }


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    return (end - start).total_seconds() if start and end else None


def deliveries(
    session: Session, *, state: str | None = None, peer: str | None = None, limit: int = 200
) -> list[dict[str, Any]]:
    """Deliveries newest first, with the job each output came from."""
    query = (
        select(Delivery, Output.job_id, Output.azimuth, Output.elevation)
        .join(Output, Output.instance_id == Delivery.output_instance_id, isouter=True)
        .order_by(Delivery.id.desc())
        .limit(limit)
    )
    if state:
        query = query.where(Delivery.state == state)
    if peer:
        query = query.where(Delivery.peer_name == peer)
    return [
        {
            "id": d.id,
            "job_id": job_id,
            "output_instance_id": d.output_instance_id,
            "azimuth": azimuth,
            "elevation": elevation,
            "peer": d.peer_name,
            "peer_ae": d.peer_ae,
            "state": d.state,
            "status_code": d.status_code,
            "status": f"0x{d.status_code:04X}" if d.status_code is not None else None,
            "attempts": d.attempts,
            "last_error": d.last_error,
            "sent_at": d.sent_at,
            "created_at": d.created_at,
        }
        for d, job_id, azimuth, elevation in session.execute(query).all()
    ]


def delivery_ids(session: Session, state: str) -> list[int]:
    """Ids of every delivery in ``state``."""
    return list(session.scalars(select(Delivery.id).where(Delivery.state == state).order_by(Delivery.id)))


def delivery_facets(session: Session) -> tuple[list[str], list[str]]:
    """The states and peer names present among deliveries (for filters)."""
    states = sorted(str(s) for s in session.scalars(select(Delivery.state).distinct()))
    peers = sorted(str(p) for p in session.scalars(select(Delivery.peer_name).distinct()))
    return states, peers


def associations(session: Session, *, accepted: bool | None = None, limit: int = 200) -> list[dict[str, Any]]:
    """Associations newest first, accepted and rejected, with the reason of each rejection."""
    query = select(Association).order_by(Association.id.desc()).limit(limit)
    if accepted is not None:
        query = query.where(Association.accepted == accepted)
    return [
        {
            "id": a.id,
            "calling_ae": a.calling_ae,
            "called_ae": a.called_ae,
            "peer_host": a.peer_host,
            "peer_port": a.peer_port,
            "started_at": a.started_at,
            "ended_at": a.ended_at,
            "accepted": a.accepted,
            "reason": a.reason,
            "n_instances": a.n_instances,
        }
        for a in session.scalars(query)
    ]


def instance_file(session: Session, instance_id: int) -> tuple[str, str] | None:
    """``(store path, sha256)`` of an instance, or None."""
    row = session.execute(select(Instance.path, Instance.sha256).where(Instance.id == instance_id)).first()
    return (row.path, row.sha256) if row else None


def patient_header(store: InstanceStore, path: str) -> dict[str, str]:
    """Patient and study identification read from the stored file (for authorised pages only)."""
    try:
        ds = pydicom.dcmread(store.absolute(path), stop_before_pixels=True, specific_tags=list(HEADER_KEYWORDS))
    except (OSError, ValueError, pydicom.errors.InvalidDicomError):
        return {}
    return {k: str(ds.get(k, "") or "") for k in HEADER_KEYWORDS}


def model_card(model_folder: Path) -> str | None:
    """The model folder's MODEL_CARD.md text, if it has one."""
    card = model_folder / "MODEL_CARD.md"
    try:
        return card.read_text(errors="replace")
    except OSError:
        return None
