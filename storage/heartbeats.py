"""Who is alive: each node process and synthesis worker records a heartbeat row.

``dicomnode status`` lists them with the age of their last heartbeat, so an operator sees every
edge and worker sharing the database, and which one holds which job. Leases, not these rows,
decide reclaims (:mod:`storage.queue`); the rows only report.
"""

from __future__ import annotations

import logging
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from storage.models import QueueWorker, utcnow

logger = logging.getLogger(__name__)


def beat(
    session: Session,
    worker_id: str,
    *,
    node: str,
    role: str,
    host: str,
    pid: int,
    job_id: int | None = None,
    started: bool = False,
    now: datetime | None = None,
) -> None:
    """Record that ``worker_id`` is alive now (and the job it holds); ``started`` resets the row."""
    now = now or utcnow()
    row = session.get(QueueWorker, worker_id)
    if row is None:
        session.add(
            QueueWorker(
                worker_id=worker_id, node=node, role=role, host=host, pid=pid, started_at=now, heartbeat_at=now,
                job_id=job_id,
            )
        )
    else:
        row.heartbeat_at, row.job_id, row.stopped_at = now, job_id, None
        row.node, row.role, row.host, row.pid = node, role, host, pid
        if started:
            row.started_at = now
    session.flush()


def stopped(session: Session, worker_id: str, now: datetime | None = None) -> None:
    """``worker_id`` stopped cleanly."""
    session.execute(
        update(QueueWorker)
        .where(QueueWorker.worker_id == worker_id)
        .values(stopped_at=now or utcnow(), job_id=None)
        .execution_options(synchronize_session=False)
    )


def list_workers(session: Session) -> list[QueueWorker]:
    """Every node and worker ever seen, by node then id."""
    return list(session.scalars(select(QueueWorker).order_by(QueueWorker.node, QueueWorker.worker_id)))
