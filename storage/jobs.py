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

The claim, lease, fencing and retry logic is the generic one of :mod:`storage.queue` (``JOBS``);
the functions here keep the job vocabulary. Functions that take a ``lease`` are fenced: they
raise :class:`storage.queue.LeaseLost` when the job moved away from that lease.
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
from storage.queue import DEFAULT_LEASE_S, JOBS, Lease, RetryPolicy

logger = logging.getLogger(__name__)

_NO_LEASE: dict[str, Any] = {"claimed_by": None, "claimed_at": None, "lease_expires_at": None, "heartbeat_at": None}

DEFAULT_MAX_ATTEMPTS = 3


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
    priority: int = 0,
) -> Job:
    """Queue a job, or return the job already queued under ``request_key``.

    The insert is ``INSERT ... ON CONFLICT (request_key) DO NOTHING`` followed by a lookup, so two
    receivers of the same instance racing here still end with one job. ``not_before`` delays the
    first claim (the settle delay that lets a whole study arrive); a higher ``priority`` is claimed
    first among due jobs.
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
        "priority": priority,
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


def claim_next_job(
    sessions: sessionmaker[Session], worker_id: str, now: datetime | None = None, lease_s: float = DEFAULT_LEASE_S
) -> Job | None:
    """Claim the most urgent queued job due at ``now`` for ``worker_id``; None when nothing is due.

    Atomic across processes and hosts (see :mod:`storage.queue`). The claim is committed before
    the job is returned, detached and fully loaded; :func:`lease_of` gives its lease.
    """
    claimed = claim_jobs(sessions, worker_id, limit=1, now=now, lease_s=lease_s)
    return claimed[0] if claimed else None


def claim_jobs(
    sessions: sessionmaker[Session],
    worker_id: str,
    *,
    limit: int = 1,
    where: Sequence[Any] = (),
    now: datetime | None = None,
    lease_s: float = DEFAULT_LEASE_S,
) -> list[Job]:
    """Claim up to ``limit`` due jobs (priority, then age) matching ``where``, atomically."""
    now = now or utcnow()
    rows = JOBS.claim(sessions, worker_id, lease_s=lease_s, limit=limit, where=where, now=now,
                      extra={"started_at": now})
    return [job for job, _ in rows]


def lease_of(job: Job) -> Lease:
    """The lease a claimed job carries (its fencing token, holder and expiry)."""
    if job.state != "running" or job.claimed_by is None or job.lease_expires_at is None:
        raise ValueError(f"job {job.id} is {job.state!r} without a lease")
    return Lease(job.id, job.lease_token, job.claimed_by, job.lease_expires_at)


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


def complete_job(session: Session, job_id: int, now: datetime | None = None, lease: Lease | None = None) -> Job:
    """A running job finished: all its outputs are stored and recorded.

    With ``lease`` (a worker) the change is fenced; without (tests, tools) it is conditional on
    the state and attempt count read.
    """
    now = now or utcnow()
    if lease is not None:
        if lease.id != job_id:
            raise ValueError(f"lease of job {lease.id} cannot complete job {job_id}")
        job = JOBS.complete(session, lease, now, finished_at=now, last_error=None)
    else:
        job = _transition(
            session, job_id, ("running",), state="done", finished_at=now, last_error=None, **_NO_LEASE
        )
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
    common: dict[str, Any] = {"attempts": attempts, "last_error": error, **_NO_LEASE}
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
    lease: Lease | None = None,
) -> Job:
    """A running job is refused by the consistency gate: terminal, the attempt counted, no retry.

    ``reason`` says why (recorded in ``last_error``); ``score`` and ``method`` are the gate's score,
    when one was computed. With ``lease`` (a worker) the change is fenced.
    """
    now = now or utcnow()
    if lease is not None:
        if lease.id != job_id:
            raise ValueError(f"lease of job {lease.id} cannot refuse job {job_id}")
        job = JOBS.finish(
            session, lease, "refused", now, finished_at=now, last_error=reason,
            consistency_score=score, consistency_method=method,
        )  # fmt: skip
        logger.warning("job %d refused: %s", job_id, reason)
        return job
    job = get_job(session, job_id)
    job = _transition(
        session,
        job_id,
        ("running",),
        state="refused",
        attempts=job.attempts + 1,
        finished_at=now,
        last_error=reason,
        consistency_score=score,
        consistency_method=method,
        **_NO_LEASE,
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


def fail_job_permanently(
    session: Session, job_id: int, error: str, now: datetime | None = None, lease: Lease | None = None
) -> Job:
    """A running job failed deterministically (the same input fails the same way every time):
    ``failed`` at once, its attempts used up, without waiting out a retry budget. With ``lease``
    (a worker) the change is fenced."""
    if lease is not None:
        if lease.id != job_id:
            raise ValueError(f"lease of job {lease.id} cannot fail job {job_id}")
        return fail_leased_job(session, lease, error, RetryPolicy(), retryable=False, now=now)
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
        **_NO_LEASE,
    )
    logger.error("job %d failed for good (not retried, the failure is deterministic): %s", job_id, error)
    return job


def fail_leased_job(
    session: Session,
    lease: Lease,
    error: str,
    policy: RetryPolicy,
    *,
    retryable: bool = True,
    now: datetime | None = None,
) -> Job:
    """The holder of ``lease`` failed its attempt: fenced, with the policy's backoff.

    A permanent error (``retryable=False``) fails the job at once; the job's own ``max_attempts``
    (frozen when it was queued) limits the retries.
    """
    now = now or utcnow()
    job = JOBS.fail(session, lease, error, policy, retryable=retryable, now=now)
    if job.state == "failed":
        job.finished_at = now
        session.flush()
    return job


def reclaim_expired_jobs(session: Session, policy: RetryPolicy, now: datetime | None = None) -> list[int]:
    """Jobs whose worker stopped renewing its lease (process or host died) go back to the queue
    with the attempt counted, or fail once attempts are used up. Any node may run this."""
    now = now or utcnow()
    ids = JOBS.reclaim_expired(session, policy, now)
    for job_id in ids:
        job = session.get_one(Job, job_id)
        if job.state == "failed":
            job.finished_at = now
    session.flush()
    return ids


def wait_for_model(session: Session, job_id: int, reason: str, lease: Lease | None = None) -> Job:
    """Park a running job whose model is not available; it does not count as an attempt."""
    if lease is not None:
        job = JOBS.release(session, lease, state="waiting_model", last_error=reason)
        logger.warning("job %d waits for its model: %s", job_id, reason)
        return job
    job = _transition(
        session,
        job_id,
        ("running",),
        state="waiting_model",
        last_error=reason,
        **_NO_LEASE,
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


def requeue_running_jobs(
    session: Session, now: datetime | None = None, claimed_by: str | Sequence[str] | None = None
) -> int:
    """At start, put jobs a crashed run left ``running`` back in the queue; returns how many.

    ``claimed_by`` (one worker id or several) limits this to this node's own workers when several
    nodes share the database; jobs of other nodes are reclaimed only when their leases expire.
    The interrupted attempt is not counted: the crash need not be the job's fault. The fencing
    token moves on, so a worker of the crashed run that is somehow still alive cannot write.
    """
    workers = [claimed_by] if isinstance(claimed_by, str) else claimed_by
    requeued = JOBS.requeue_held_by(
        session, workers, "interrupted: the node stopped while the job was running", now=now or utcnow()
    )
    if requeued:
        session.execute(
            update(Job)
            .where(Job.state == "queued", Job.started_at.is_not(None), Job.finished_at.is_(None))
            .values(started_at=None)
            .execution_options(synchronize_session=False)
        )
        logger.warning("%d interrupted running jobs queued again", requeued)
    return requeued


def retry_job(session: Session, job_id: int, now: datetime | None = None) -> Job:
    """An operator asks for a failed job to run again, with a fresh set of attempts."""
    try:
        job = JOBS.retry(session, job_id, ("failed",), now=now, finished_at=None, started_at=None)
    except (LookupError, ValueError) as e:
        raise StorageError(str(e)) from e
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
