"""One durable, leased work queue for synthesis jobs and deliveries alike.

A row of a queue table (``jobs``, ``deliveries``) *is* the message: it freezes what is asked
(views, destinations, peer) and carries the queue columns every kind shares:

``state``            ready -> claimed -> done, or back to ready after a retryable failure, or
                     dead (the dead-letter state) once attempts are used up or the error is
                     permanent;
``attempts``         failed attempts so far (a ``max_attempts`` column on the row, when there is
                     one, freezes the limit the row was queued with);
``not_before``       not claimable before this time (settle delay, retry backoff);
``priority``         higher first; then oldest ``not_before``, then id (age);
``claimed_by``       the worker holding the lease, ``claimed_at`` when it took it;
``lease_expires_at`` the lease runs out unless ``heartbeat`` extends it; any node reclaims a row
                     whose lease expired (its holder died, or its host did);
``lease_token``      the fencing token: every claim, reclaim, requeue and operator retry bumps
                     it, and every write a worker makes is conditional on the token it was given,
                     the claimed state, its own name and an unexpired lease. A worker whose row
                     moved gets :class:`LeaseLost` and drops the work; it can never write.

Claims are atomic on both databases: PostgreSQL locks candidates with ``SELECT ... FOR UPDATE
SKIP LOCKED``; SQLite moves each candidate with a conditional ``UPDATE`` and keeps it only if
that changed one row (SQLite has one writer at a time). Claims commit their own transaction; the
other functions flush on the caller's session and leave the commit to the caller, so a worker can
fence, write its outputs and complete in one transaction.

Deliveries have no separate claimed state (``pending`` is both ready and claimed; a live lease is
what marks a claim), so other code that knows the three delivery states keeps working.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Generic, TypeVar

from sqlalchemy import ColumnElement, and_, or_, select, update
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import Session, sessionmaker

from storage.models import Delivery, Job, utcnow

logger = logging.getLogger(__name__)

DEFAULT_LEASE_S = 60.0
_CLAIM_CANDIDATES = 16

Row = TypeVar("Row", Job, Delivery)


class LeaseLost(Exception):
    """The row this worker held was moved (lease expired, reclaimed, requeued, retried by an
    operator, or finished by someone else): the worker must drop its work without writing."""


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with a cap and optional jitter, and a limit on attempts.

    Attempt ``n`` (counting from 1) waits ``initial_s * 2**(n-1)``, capped at ``max_s``, then
    multiplied by a random factor in ``[1 - jitter, 1]`` so that many rows failing together (a
    PACS that was down) do not all come back in the same second. The caller says whether an
    error is worth retrying at all: a permanent error (an input the engine can never process, a
    peer that refuses the SOP class) goes straight to the dead-letter state.
    """

    max_attempts: int = 5
    initial_s: float = 10.0
    max_s: float = 600.0
    jitter: float = 0.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts {self.max_attempts} must be at least 1")
        if self.initial_s <= 0 or self.max_s < self.initial_s:
            raise ValueError(f"backoff {self.initial_s} .. {self.max_s} s must be positive and increasing")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError(f"jitter {self.jitter} must be between 0 and 1")

    def backoff_s(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after failed attempt ``attempt`` (counting from 1)."""
        delay = float(min(self.max_s, self.initial_s * 2 ** max(0, attempt - 1)))
        if self.jitter:
            delay *= 1.0 - self.jitter * (rng or random).random()
        return delay

    def backoff(self, attempt: int, rng: random.Random | None = None) -> timedelta:
        return timedelta(seconds=self.backoff_s(attempt, rng))

    def gives_up(self, attempts: int, retryable: bool = True, max_attempts: int | None = None) -> bool:
        """Whether a row that has now failed ``attempts`` times goes to the dead-letter state."""
        return not retryable or attempts >= (max_attempts or self.max_attempts)


@dataclass(frozen=True)
class Lease:
    """What a claim hands the worker: the row, its fencing token, who holds it, until when."""

    id: int
    token: int
    worker_id: str
    expires_at: datetime


@dataclass(frozen=True)
class Queue(Generic[Row]):
    """The queue over one table: which state names mean ready, claimed, done and dead."""

    model: type[Row]
    kind: str
    ready: str
    claimed: str
    done: str
    dead: str
    parked: tuple[str, ...] = field(default=())

    # ------------------------------------------------------------------------------- claims
    def _claimable(self, now: datetime) -> ColumnElement[bool]:
        m = self.model
        lease_free = or_(m.lease_expires_at.is_(None), m.lease_expires_at < now)
        return and_(m.state == self.ready, m.not_before <= now, lease_free)

    def claim(
        self,
        sessions: sessionmaker[Session],
        worker_id: str,
        *,
        lease_s: float = DEFAULT_LEASE_S,
        limit: int = 1,
        where: Sequence[ColumnElement[bool]] = (),
        now: datetime | None = None,
        extra: dict[str, Any] | None = None,
    ) -> list[tuple[Row, Lease]]:
        """Claim up to ``limit`` due rows (priority, then age) for ``worker_id``, atomically.

        Each claimed row is returned detached and fully loaded with its :class:`Lease`. ``where``
        narrows the candidates (a worker batching jobs that share settings); ``extra`` adds
        values to set on claim (``started_at``).
        """
        if not worker_id or len(worker_id) > 128:
            raise ValueError(f"worker_id {worker_id!r} must be 1 to 128 characters")
        if limit < 1:
            raise ValueError(f"limit {limit} must be at least 1")
        now = now or utcnow()
        m = self.model
        expires = now + timedelta(seconds=lease_s)
        values: dict[str, Any] = {
            "state": self.claimed,
            "claimed_by": worker_id,
            "claimed_at": now,
            "heartbeat_at": now,
            "lease_expires_at": expires,
            "lease_token": m.lease_token + 1,
            **(extra or {}),
        }
        due = (
            select(m.id)
            .where(self._claimable(now), *where)
            .order_by(m.priority.desc(), m.not_before, m.id)
        )
        with sessions() as session:
            if session.get_bind().dialect.name == "postgresql":
                ids = list(session.scalars(due.limit(limit).with_for_update(skip_locked=True)))
                if ids:
                    session.execute(
                        update(m).where(m.id.in_(ids)).values(**values).execution_options(synchronize_session=False)
                    )
            else:
                ids = self._claim_sqlite(session, due, values, limit, now)
            session.commit()
            rows = []
            for row_id in ids:
                row = session.get_one(m, row_id, populate_existing=True)
                session.expunge(row)
                rows.append((row, Lease(row.id, row.lease_token, worker_id, expires)))
        for row, lease in rows:
            logger.info(
                "%s %d claimed by %s (attempt %d, token %d)", self.kind, row.id, worker_id, row.attempts + 1,
                lease.token,
            )
        return rows

    def _claim_sqlite(self, session: Session, due: Any, values: dict[str, Any], limit: int, now: datetime) -> list[int]:
        m = self.model
        taken: list[int] = []
        seen: set[int] = set()
        while len(taken) < limit:
            candidates = [i for i in session.scalars(due.limit(limit + _CLAIM_CANDIDATES)) if i not in seen]
            if not candidates:
                break
            for row_id in candidates:
                seen.add(row_id)
                # Taken only if still claimable now: another worker may have moved it since our read.
                result = session.execute(
                    update(m)
                    .where(m.id == row_id, self._claimable(now))
                    .values(**values)
                    .execution_options(synchronize_session=False)
                )
                if _rowcount(result) == 1:
                    taken.append(row_id)
                    if len(taken) == limit:
                        break
        return taken

    # ------------------------------------------------------------------------------ fencing
    def _held(self, lease: Lease, now: datetime) -> ColumnElement[bool]:
        m = self.model
        return and_(
            m.id == lease.id,
            m.lease_token == lease.token,
            m.state == self.claimed,
            m.claimed_by == lease.worker_id,
            m.lease_expires_at >= now,
        )

    def _fenced_update(self, session: Session, lease: Lease, now: datetime, what: str, **values: Any) -> None:
        m = self.model
        result = session.execute(
            update(m).where(self._held(lease, now)).values(**values).execution_options(synchronize_session=False)
        )
        if _rowcount(result) != 1:
            row = session.get(m, lease.id, populate_existing=True)
            where = f"{row.state!r}, token {row.lease_token}, held by {row.claimed_by}" if row else "gone"
            raise LeaseLost(
                f"{self.kind} {lease.id}: cannot {what}: lease token {lease.token} of {lease.worker_id} "
                f"no longer holds it (now {where})"
            )

    def heartbeat(self, session: Session, lease: Lease, lease_s: float, now: datetime | None = None) -> Lease:
        """Extend the lease; :class:`LeaseLost` when the row moved. Returns the extended lease."""
        now = now or utcnow()
        expires = now + timedelta(seconds=lease_s)
        self._fenced_update(session, lease, now, "extend its lease", heartbeat_at=now, lease_expires_at=expires)
        return Lease(lease.id, lease.token, lease.worker_id, expires)

    def fence(self, session: Session, lease: Lease, now: datetime | None = None) -> None:
        """Check, inside the caller's transaction, that ``lease`` still holds its row, and lock it.

        The conditional update takes the row's write lock (PostgreSQL) or the database's
        (SQLite) until the caller commits, so nobody can reclaim the row between this check and
        the caller's outputs and completion. Raises :class:`LeaseLost` when the row moved.
        """
        now = now or utcnow()
        self._fenced_update(session, lease, now, "write its results", heartbeat_at=now)

    # --------------------------------------------------------------------------- outcomes
    def complete(self, session: Session, lease: Lease, now: datetime | None = None, **values: Any) -> Row:
        """The holder finished: the row becomes ``done`` (``values`` adds what it records)."""
        now = now or utcnow()
        self._fenced_update(session, lease, now, "complete it", state=self.done, **_released(), **values)
        return self._reload(session, lease.id)

    def finish(self, session: Session, lease: Lease, state: str, now: datetime | None = None, **values: Any) -> Row:
        """The holder ends the row in another terminal ``state`` than done (a job the consistency
        gate ``refused``): fenced like :meth:`complete`, the attempt counted, never retried."""
        if state in (self.ready, self.claimed, self.done) or state in self.parked:
            raise ValueError(f"{self.kind} cannot finish in {state!r}: not a terminal state of its own")
        now = now or utcnow()
        row = self._reload(session, lease.id)
        self._fenced_update(
            session, lease, now, f"end it {state}", state=state, attempts=row.attempts + 1, **_released(), **values
        )
        return self._reload(session, lease.id)

    def fail(
        self,
        session: Session,
        lease: Lease,
        error: str,
        policy: RetryPolicy,
        *,
        retryable: bool = True,
        now: datetime | None = None,
        rng: random.Random | None = None,
        **values: Any,
    ) -> Row:
        """The holder's attempt failed: back to ready after the policy's backoff, or dead."""
        now = now or utcnow()
        row = self._reload(session, lease.id)
        attempts = row.attempts + 1
        outcome = self._outcome(row, attempts, policy, retryable, now, rng)
        self._fenced_update(
            session, lease, now, "record its failure", attempts=attempts, last_error=error, **outcome, **values
        )
        row = self._reload(session, lease.id)
        self._log_failure(row, attempts, error, retryable)
        return row

    def release(self, session: Session, lease: Lease, state: str | None = None, now: datetime | None = None,
                **values: Any) -> Row:
        """Give the row back without counting an attempt (to ``state``: ready or a parked one)."""
        now = now or utcnow()
        target = state or self.ready
        if target != self.ready and target not in self.parked:
            raise ValueError(f"{self.kind} cannot be released to {target!r}")
        self._fenced_update(session, lease, now, "release it", state=target, not_before=now, **_released(), **values)
        return self._reload(session, lease.id)

    def _outcome(
        self, row: Row, attempts: int, policy: RetryPolicy, retryable: bool, now: datetime, rng: random.Random | None
    ) -> dict[str, Any]:
        if policy.gives_up(attempts, retryable, getattr(row, "max_attempts", None)):
            return {"state": self.dead, **_released()}
        return {"state": self.ready, "not_before": now + policy.backoff(attempts, rng), **_released()}

    def _log_failure(self, row: Row, attempts: int, error: str, retryable: bool) -> None:
        if row.state == self.dead:
            why = "permanent error" if not retryable else f"after {attempts} attempts"
            logger.error("%s %d failed for good (%s): %s", self.kind, row.id, why, error)
        else:
            logger.warning(
                "%s %d failed (attempt %d), retry at %s: %s", self.kind, row.id, attempts, row.not_before, error
            )

    # ---------------------------------------------------------------- recovery and operators
    def reclaim_expired(
        self, session: Session, policy: RetryPolicy, now: datetime | None = None, rng: random.Random | None = None
    ) -> list[int]:
        """Take back every row whose lease expired (its holder died, or its host did).

        Any node may call this. The interrupted attempt counts as a failed one (with backoff), so
        an input that kills the worker every time ends dead instead of looping forever. The token
        is bumped: the old holder, should it come back, can no longer write.
        """
        now = now or utcnow()
        m = self.model
        expired = and_(m.state == self.claimed, m.lease_expires_at.is_not(None), m.lease_expires_at < now)
        rows = list(session.scalars(select(m).where(expired).order_by(m.id)))
        reclaimed = []
        for row in rows:
            attempts = row.attempts + 1
            error = f"lease of {row.claimed_by} expired at {row.lease_expires_at}: holder presumed dead"
            outcome = self._outcome(row, attempts, policy, True, now, rng)
            result = session.execute(
                update(m)
                .where(m.id == row.id, m.lease_token == row.lease_token, expired)
                .values(attempts=attempts, last_error=error, lease_token=m.lease_token + 1, **outcome)
                .execution_options(synchronize_session=False)
            )
            if _rowcount(result) == 1:
                reclaimed.append(row.id)
                logger.warning("%s %d reclaimed: %s", self.kind, row.id, error)
        session.expire_all()
        return reclaimed

    def requeue_held_by(self, session: Session, worker_ids: Sequence[str] | None, reason: str,
                        now: datetime | None = None) -> int:
        """Put rows held by these workers (None: by anyone) back, not counting an attempt."""
        now = now or utcnow()
        m = self.model
        query = update(m).where(m.state == self.claimed, m.claimed_by.is_not(None))
        if worker_ids is not None:
            query = query.where(m.claimed_by.in_(list(worker_ids)))
        result = session.execute(
            query.values(
                state=self.ready, not_before=now, last_error=reason, lease_token=m.lease_token + 1, **_released()
            ).execution_options(synchronize_session=False)
        )
        session.expire_all()
        return _rowcount(result)

    def retry(self, session: Session, row_id: int, from_states: tuple[str, ...], now: datetime | None = None,
              **values: Any) -> Row:
        """An operator sends a row round again with fresh attempts; the token moves on."""
        now = now or utcnow()
        m = self.model
        row = session.get(m, row_id)
        if row is None:
            raise LookupError(f"{self.kind} {row_id} does not exist")
        if row.state not in from_states:
            raise ValueError(f"{self.kind} {row_id} is {row.state!r}, not {' or '.join(from_states)}")
        result = session.execute(
            update(m)
            .where(m.id == row_id, m.state == row.state, m.lease_token == row.lease_token)
            .values(
                state=self.ready, attempts=0, not_before=now, lease_token=m.lease_token + 1, **_released(), **values
            )
            .execution_options(synchronize_session=False)
        )
        if _rowcount(result) != 1:
            raise ValueError(f"{self.kind} {row_id} changed while being queued again")
        return self._reload(session, row_id)

    def _reload(self, session: Session, row_id: int) -> Row:
        return session.get_one(self.model, row_id, populate_existing=True)


def _released() -> dict[str, Any]:
    return {"claimed_by": None, "claimed_at": None, "lease_expires_at": None, "heartbeat_at": None}


def _rowcount(result: Any) -> int:
    assert isinstance(result, CursorResult)
    return int(result.rowcount)


JOBS: Queue[Job] = Queue(
    model=Job, kind="job", ready="queued", claimed="running", done="done", dead="failed", parked=("waiting_model",)
)
DELIVERIES: Queue[Delivery] = Queue(
    model=Delivery, kind="delivery", ready="pending", claimed="pending", done="sent", dead="failed"
)
