"""The job queue: enqueue once, claim atomically, retry with backoff, survive restarts.

States: ``queued`` -> ``running`` (claimed by one worker) -> ``done``, or back to ``queued`` with
a later ``not_before`` after a failure, until ``max_attempts`` failures make it ``failed``.
``waiting_model`` parks a job whose model is not available yet; ``release_waiting_jobs`` queues
such jobs again. ``refused`` is terminal: the model cannot ground the input (outside its intended
inputs, or a consistency score below its threshold); it is never retried, not even by
``retry_job``, since the same input and model are refused the same way again.

Every transition is a conditional UPDATE on the state (and attempt count) the caller read, so two
workers, or a worker and an operator, can never both move the same job. ``claim_next_job`` runs
and commits its own transaction; the other functions flush on the caller's session and leave the
commit to the caller.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.errors import StorageError
from storage.db import affected_rows
from storage.models import JOB_STATES, Job, utcnow

logger = logging.getLogger(__name__)

DEFAULT_MAX_ATTEMPTS = 3
_CLAIM_BATCH = 8


def _angles(name: str, values: Sequence[float]) -> list[float]:
    angles = [float(v) for v in values]
    if not angles or not all(math.isfinite(a) for a in angles):
        raise ValueError(f"{name} {list(values)!r} must be a non-empty list of finite degrees")
    return angles


def enqueue_job(
    session: Session,
    *,
    input_instance_id: int,
    rule_name: str,
    azimuths: Sequence[float],
    elevations: Sequence[float],
    destinations: Sequence[str],
    request_key: str,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    not_before: datetime | None = None,
    now: datetime | None = None,
) -> Job:
    """Queue a job, or return the job already queued under ``request_key``.

    The insert is ``INSERT ... ON CONFLICT (request_key) DO NOTHING`` followed by a lookup, so two
    receivers of the same instance racing here still end with one job. ``not_before`` delays the
    first claim (the settle delay that lets a whole study arrive).
    """
    if not request_key or len(request_key) > 128:
        raise ValueError(f"request_key {request_key!r} must be 1 to 128 characters")
    if max_attempts < 1:
        raise ValueError(f"max_attempts {max_attempts} must be at least 1")
    if isinstance(destinations, str) or not all(isinstance(d, str) and d for d in destinations):
        raise ValueError(f"destinations {destinations!r} must be a list of peer names")
    now = now or utcnow()
    values: dict[str, Any] = {
        "input_instance_id": input_instance_id,
        "rule_name": rule_name,
        "azimuths": _angles("azimuths", azimuths),
        "elevations": _angles("elevations", elevations),
        "destinations": list(destinations),
        "state": "queued",
        "attempts": 0,
        "max_attempts": max_attempts,
        "not_before": not_before or now,
        "created_at": now,
        "request_key": request_key,
    }
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        insert_stmt: Any = postgresql.insert(Job)
    elif dialect == "sqlite":
        insert_stmt = sqlite.insert(Job)
    else:
        raise StorageError(f"database dialect {dialect!r} is not supported (SQLite or PostgreSQL)")
    result = session.execute(insert_stmt.values(**values).on_conflict_do_nothing(index_elements=["request_key"]))
    job = session.scalars(select(Job).where(Job.request_key == request_key)).one()
    if affected_rows(result) == 1:
        logger.info("job %d queued: rule %s, input instance %d", job.id, rule_name, input_instance_id)
    else:
        logger.info("job %d already exists for request %s (state %s)", job.id, request_key, job.state)
    return job


def claim_next_job(sessions: sessionmaker[Session], worker_id: str, now: datetime | None = None) -> Job | None:
    """Claim the oldest queued job due at ``now`` for ``worker_id``; None when nothing is due.

    Atomic across processes: PostgreSQL locks the candidate row with ``FOR UPDATE SKIP LOCKED``
    (other workers skip it instead of waiting); SQLite moves it with ``UPDATE ... WHERE
    state = 'queued'`` and takes it only if that changed one row. The claim is committed before
    the job is returned, detached and fully loaded.
    """
    if not worker_id or len(worker_id) > 128:
        raise ValueError(f"worker_id {worker_id!r} must be 1 to 128 characters")
    now = now or utcnow()
    due = select(Job).where(Job.state == "queued", Job.not_before <= now).order_by(Job.not_before, Job.id)
    claim = {"state": "running", "claimed_by": worker_id, "claimed_at": now, "started_at": now}
    with sessions() as session:
        if session.get_bind().dialect.name == "postgresql":
            job_id = _claim_skip_locked(session, due, claim)
        else:
            job_id = _claim_by_conditional_update(session, due, claim)
        if job_id is None:
            return None
        job = session.get_one(Job, job_id, populate_existing=True)
        session.expunge(job)
    logger.info("job %d claimed by %s (attempt %d of %d)", job.id, worker_id, job.attempts + 1, job.max_attempts)
    return job


def _claim_skip_locked(session: Session, due: Any, claim: dict[str, Any]) -> int | None:
    job_id = session.scalars(due.with_only_columns(Job.id).limit(1).with_for_update(skip_locked=True)).first()
    if job_id is None:
        session.rollback()
        return None
    session.execute(update(Job).where(Job.id == job_id).values(**claim).execution_options(synchronize_session=False))
    session.commit()
    return job_id


def _claim_by_conditional_update(session: Session, due: Any, claim: dict[str, Any]) -> int | None:
    while True:
        candidates = list(session.scalars(due.with_only_columns(Job.id).limit(_CLAIM_BATCH)))
        if not candidates:
            return None
        for job_id in candidates:
            result = session.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == "queued")
                .values(**claim)
                .execution_options(synchronize_session=False)
            )
            session.commit()
            if affected_rows(result) == 1:
                return job_id
        # Every candidate went to another worker between our read and our update: read again.


def get_job(session: Session, job_id: int) -> Job:
    """The job with this id; ``StorageError`` if there is none."""
    job = session.get(Job, job_id)
    if job is None:
        raise StorageError(f"job {job_id} does not exist")
    return job


def _transition(session: Session, job_id: int, from_states: tuple[str, ...], **values: Any) -> Job:
    """Apply ``values`` to the job only if it is still in one of ``from_states`` with the attempt
    count we read; raise ``StorageError`` naming the state it is in otherwise."""
    job = get_job(session, job_id)
    if job.state not in from_states:
        raise StorageError(f"job {job_id} is {job.state!r}, not {' or '.join(from_states)}")
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == job.state, Job.attempts == job.attempts)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    if affected_rows(result) != 1:
        raise StorageError(f"job {job_id} changed while being updated from {job.state!r}")
    session.refresh(job)
    return job


def complete_job(session: Session, job_id: int, now: datetime | None = None) -> Job:
    """A running job finished: all its outputs are stored and recorded."""
    job = _transition(session, job_id, ("running",), state="done", finished_at=now or utcnow(), last_error=None)
    logger.info("job %d done", job_id)
    return job


def fail_job(session: Session, job_id: int, error: str, backoff: timedelta, now: datetime | None = None) -> Job:
    """A running job failed: count the attempt; queue it again after ``backoff``, or give up.

    The job goes back to ``queued`` with ``not_before = now + backoff`` while attempts remain
    (attempts < max_attempts), and becomes ``failed`` once they are used up.
    """
    if backoff < timedelta(0):
        raise ValueError(f"backoff {backoff} is negative")
    now = now or utcnow()
    job = get_job(session, job_id)
    attempts = job.attempts + 1
    common: dict[str, Any] = {
        "attempts": attempts,
        "last_error": error,
        "claimed_by": None,
        "claimed_at": None,
    }
    if attempts < job.max_attempts:
        job = _transition(session, job_id, ("running",), state="queued", not_before=now + backoff, **common)
        logger.warning(
            "job %d failed (attempt %d of %d), retry after %s: %s",
            job_id,
            attempts,
            job.max_attempts,
            backoff,
            error,
        )
    else:
        job = _transition(session, job_id, ("running",), state="failed", finished_at=now, **common)
        logger.error("job %d failed for good after %d attempts: %s", job_id, attempts, error)
    return job


def refuse_job(
    session: Session,
    job_id: int,
    reason: str,
    score: float | None = None,
    method: str | None = None,
    now: datetime | None = None,
) -> Job:
    """A running job is refused by the consistency gate: terminal, the attempt counted, no retry.

    ``reason`` says why (recorded in ``last_error``); ``score`` and ``method`` are the gate's score,
    when one was computed.
    """
    job = get_job(session, job_id)
    job = _transition(
        session,
        job_id,
        ("running",),
        state="refused",
        attempts=job.attempts + 1,
        finished_at=now or utcnow(),
        last_error=reason,
        consistency_score=score,
        consistency_method=method,
        claimed_by=None,
        claimed_at=None,
    )
    logger.warning("job %d refused: %s", job_id, reason)
    return job


def record_consistency(session: Session, job_id: int, score: float, method: str) -> None:
    """Store the consistency gate's score of a job's input (the job passed the gate)."""
    get_job(session, job_id)
    session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(consistency_score=score, consistency_method=method)
        .execution_options(synchronize_session=False)
    )


def fail_job_permanently(session: Session, job_id: int, error: str, now: datetime | None = None) -> Job:
    """A running job failed deterministically (the same input fails the same way every time):
    ``failed`` at once, its attempts used up, without waiting out a retry budget."""
    job = get_job(session, job_id)
    attempts = job.attempts + 1
    job = _transition(
        session,
        job_id,
        ("running",),
        state="failed",
        attempts=attempts,
        finished_at=now or utcnow(),
        last_error=error,
        claimed_by=None,
        claimed_at=None,
    )
    logger.error("job %d failed for good (not retried, the failure is deterministic): %s", job_id, error)
    return job


def wait_for_model(session: Session, job_id: int, reason: str) -> Job:
    """Park a running job whose model is not available; it does not count as an attempt."""
    job = _transition(
        session,
        job_id,
        ("running",),
        state="waiting_model",
        last_error=reason,
        claimed_by=None,
        claimed_at=None,
    )
    logger.warning("job %d waits for its model: %s", job_id, reason)
    return job


def release_waiting_jobs(session: Session, now: datetime | None = None) -> int:
    """Queue every job that waits for a model again (call once models are available)."""
    result = session.execute(
        update(Job)
        .where(Job.state == "waiting_model")
        .values(state="queued", not_before=now or utcnow())
        .execution_options(synchronize_session=False)
    )
    session.expire_all()
    released = affected_rows(result)
    if released:
        logger.info("%d jobs waiting for a model queued again", released)
    return released


def requeue_running_jobs(session: Session, now: datetime | None = None, claimed_by: str | None = None) -> int:
    """At start, put jobs a crashed run left ``running`` back in the queue; returns how many.

    ``claimed_by`` limits this to one worker's jobs when several nodes share the database. The
    interrupted attempt is not counted: the crash need not be the job's fault.
    """
    now = now or utcnow()
    query = update(Job).where(Job.state == "running")
    if claimed_by is not None:
        query = query.where(Job.claimed_by == claimed_by)
    result = session.execute(
        query.values(
            state="queued",
            not_before=now,
            claimed_by=None,
            claimed_at=None,
            started_at=None,
            last_error="interrupted: the node stopped while the job was running",
        ).execution_options(synchronize_session=False)
    )
    session.expire_all()
    requeued = affected_rows(result)
    if requeued:
        logger.warning("%d interrupted running jobs queued again", requeued)
    return requeued


def retry_job(session: Session, job_id: int, now: datetime | None = None) -> Job:
    """An operator asks for a failed job to run again, with a fresh set of attempts."""
    job = _transition(
        session,
        job_id,
        ("failed",),
        state="queued",
        attempts=0,
        not_before=now or utcnow(),
        finished_at=None,
        claimed_by=None,
        claimed_at=None,
        started_at=None,
    )
    logger.info("job %d queued again by request", job_id)
    return job


def list_jobs(
    session: Session, *, state: str | None = None, rule_name: str | None = None, limit: int = 100
) -> list[Job]:
    """Jobs, newest first, optionally in one state or of one rule."""
    query = select(Job).order_by(Job.created_at.desc(), Job.id.desc()).limit(limit)
    if state is not None:
        if state not in JOB_STATES:
            raise ValueError(f"job state {state!r} is not one of {', '.join(JOB_STATES)}")
        query = query.where(Job.state == state)
    if rule_name is not None:
        query = query.where(Job.rule_name == rule_name)
    return list(session.scalars(query))
