"""Deliveries: each derived instance to each configured peer, retried until sent or given up.

A delivery is ``pending`` until a C-STORE to the peer returns a status the sender accepts
(success or a warning, PS3.4 B.2.3), then ``sent`` with that DIMSE status; after
``max_attempts`` failures it is ``failed`` until an operator asks to ``resend`` it. Functions
flush on the caller's session and leave the commit to the caller.

Deliveries use the generic leased queue of :mod:`storage.queue` (``DELIVERIES``): a sender claims
due deliveries with a lease before it opens an association, so two nodes on one database never
send the same instance, and records the outcome fenced by the lease it was given.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import exists, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.errors import StorageError
from storage.db import affected_rows
from storage.models import DELIVERY_STATES, Delivery, Output, utcnow
from storage.queue import DEFAULT_LEASE_S, DELIVERIES, Lease, RetryPolicy
from storage.recalls import recall_of_instance

logger = logging.getLogger(__name__)

_NO_LEASE: dict[str, Any] = {"claimed_by": None, "claimed_at": None, "lease_expires_at": None, "heartbeat_at": None}


@dataclass(frozen=True)
class _FixedBackoff(RetryPolicy):
    """A policy whose backoff the caller already computed (``mark_failed``'s ``backoff``)."""

    delay: timedelta = timedelta(0)

    def backoff(self, attempt: int, rng: Any = None) -> timedelta:
        return self.delay


@dataclass(frozen=True)
class DeliveryTarget:
    """A peer as a delivery names it: the site's peer name and where it listens."""

    peer_name: str
    peer_ae: str
    peer_host: str
    peer_port: int

    def __post_init__(self) -> None:
        if not self.peer_name or len(self.peer_name) > 64:
            raise ValueError(f"peer_name {self.peer_name!r} must be 1 to 64 characters")
        if not self.peer_ae.strip() or len(self.peer_ae) > 16:
            raise ValueError(f"peer_ae {self.peer_ae!r} must be 1 to 16 characters (PS3.5 6.2 AE)")
        if not self.peer_host:
            raise ValueError(f"peer_host {self.peer_host!r} is empty")
        if not 0 < self.peer_port < 65536:
            raise ValueError(f"peer_port {self.peer_port} is not a TCP port")


def create_deliveries(
    session: Session, output_instance_id: int, targets: Sequence[DeliveryTarget], now: datetime | None = None
) -> list[Delivery]:
    """A pending delivery of the instance to each target; existing ones are kept as they are.

    Idempotent on (output instance, peer name), so a retried job does not send twice. A
    recalled instance gets none (``StorageError``).
    """
    now = now or utcnow()
    _refuse_recalled(session, output_instance_id)
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        insert: Any = postgresql.insert
    elif dialect == "sqlite":
        insert = sqlite.insert
    else:
        raise StorageError(f"database dialect {dialect!r} is not supported (SQLite or PostgreSQL)")
    for target in targets:
        session.execute(
            insert(Delivery)
            .values(
                output_instance_id=output_instance_id,
                peer_name=target.peer_name,
                peer_ae=target.peer_ae,
                peer_host=target.peer_host,
                peer_port=target.peer_port,
                state="pending",
                attempts=0,
                not_before=now,
                created_at=now,
            )
            .on_conflict_do_nothing(index_elements=["output_instance_id", "peer_name"])
        )
    names = [t.peer_name for t in targets]
    if not names:
        return []
    return list(
        session.scalars(
            select(Delivery)
            .where(Delivery.output_instance_id == output_instance_id, Delivery.peer_name.in_(names))
            .order_by(Delivery.id)
        )
    )


def _refuse_recalled(session: Session, output_instance_id: int) -> None:
    recall_id = recall_of_instance(session, output_instance_id)
    if recall_id is not None:
        raise StorageError(f"instance {output_instance_id} was recalled (recall {recall_id}): it is never sent again")


def due_deliveries(session: Session, now: datetime | None = None, limit: int = 100) -> list[Delivery]:
    """Pending deliveries whose ``not_before`` has come, oldest first; never one of a recalled output."""
    now = now or utcnow()
    return list(
        session.scalars(
            select(Delivery)
            .where(Delivery.state == "pending", Delivery.not_before <= now, ~_recalled())
            .order_by(Delivery.not_before, Delivery.id)
            .limit(limit)
        )
    )


def claim_deliveries(
    sessions: sessionmaker[Session],
    worker_id: str,
    *,
    limit: int = 100,
    now: datetime | None = None,
    lease_s: float = DEFAULT_LEASE_S,
) -> list[tuple[Delivery, Lease]]:
    """Claim up to ``limit`` due pending deliveries for ``worker_id`` (atomic across nodes); never
    one of a recalled output."""
    return DELIVERIES.claim(sessions, worker_id, lease_s=lease_s, limit=limit, now=now, where=(~_recalled(),))


def _recalled() -> Any:
    """True for a delivery whose output a recall withdrew."""
    return exists().where(Output.instance_id == Delivery.output_instance_id, Output.recall_id.is_not(None))


def reclaim_expired_deliveries(session: Session, policy: RetryPolicy, now: datetime | None = None) -> list[int]:
    """Deliveries whose sender died while holding them become due again (attempt counted)."""
    return DELIVERIES.reclaim_expired(session, policy, now)


def get_delivery(session: Session, delivery_id: int) -> Delivery:
    """The delivery with this id; ``StorageError`` if there is none."""
    delivery = session.get(Delivery, delivery_id)
    if delivery is None:
        raise StorageError(f"delivery {delivery_id} does not exist")
    return delivery


def _transition(session: Session, delivery_id: int, from_states: tuple[str, ...], **values: Any) -> Delivery:
    """Apply ``values`` only if the delivery is still as we read it (state and attempts)."""
    delivery = get_delivery(session, delivery_id)
    if delivery.state not in from_states:
        raise StorageError(f"delivery {delivery_id} is {delivery.state!r}, not {' or '.join(from_states)}")
    result = session.execute(
        update(Delivery)
        .where(
            Delivery.id == delivery_id,
            Delivery.state == delivery.state,
            Delivery.attempts == delivery.attempts,
        )
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    if affected_rows(result) != 1:
        raise StorageError(f"delivery {delivery_id} changed while being updated from {delivery.state!r}")
    session.refresh(delivery)
    return delivery


def mark_sent(
    session: Session, delivery_id: int, status_code: int, now: datetime | None = None, lease: Lease | None = None
) -> Delivery:
    """The peer stored the instance and answered ``status_code`` (0x0000, or a warning).

    With ``lease`` (a sender) the change is fenced by the lease (:class:`storage.queue.LeaseLost`).
    """
    now = now or utcnow()
    delivery = get_delivery(session, delivery_id)
    values: dict[str, Any] = {
        "status_code": status_code,
        "attempts": delivery.attempts + 1,
        "sent_at": now,
        "last_error": None,
    }
    if lease is not None:
        delivery = DELIVERIES.complete(session, lease, now, **values)
    else:
        delivery = _transition(session, delivery_id, ("pending",), state="sent", **values, **_NO_LEASE)
    logger.info("delivery %d to %s sent, status 0x%04X", delivery_id, delivery.peer_name, status_code)
    return delivery


def mark_failed(
    session: Session,
    delivery_id: int,
    error: str,
    backoff: timedelta,
    max_attempts: int,
    status_code: int | None = None,
    now: datetime | None = None,
    lease: Lease | None = None,
    retryable: bool = True,
) -> Delivery:
    """A send failed (no association, or a failure status): retry after ``backoff`` or give up.

    Stays ``pending`` with ``not_before = now + backoff`` while attempts < ``max_attempts``;
    becomes ``failed`` once they are used up, or at once when the error is not ``retryable``.
    With ``lease`` the change is fenced by it.
    """
    if lease is not None:
        policy = _FixedBackoff(max_attempts=max_attempts, delay=backoff)
        return DELIVERIES.fail(
            session, lease, error, policy, retryable=retryable, now=now, status_code=status_code
        )
    if backoff < timedelta(0):
        raise ValueError(f"backoff {backoff} is negative")
    if max_attempts < 1:
        raise ValueError(f"max_attempts {max_attempts} must be at least 1")
    now = now or utcnow()
    delivery = get_delivery(session, delivery_id)
    attempts = delivery.attempts + 1
    common: dict[str, Any] = {"attempts": attempts, "last_error": error, "status_code": status_code, **_NO_LEASE}
    if attempts < max_attempts and retryable:
        delivery = _transition(session, delivery_id, ("pending",), not_before=now + backoff, **common)
        logger.warning(
            "delivery %d to %s failed (attempt %d of %d), retry after %s: %s",
            delivery_id,
            delivery.peer_name,
            attempts,
            max_attempts,
            backoff,
            error,
        )
    else:
        delivery = _transition(session, delivery_id, ("pending",), state="failed", **common)
        logger.error(
            "delivery %d to %s failed for good after %d attempts: %s",
            delivery_id,
            delivery.peer_name,
            attempts,
            error,
        )
    return delivery


def resend(session: Session, delivery_id: int, now: datetime | None = None) -> Delivery:
    """An operator asks for a failed or already sent delivery to go again, with fresh attempts.

    Sending the same instance again is safe: its UIDs and pixels are unchanged. A recalled
    instance is refused (``StorageError``): a rejection note withdrew it.
    """
    _refuse_recalled(session, get_delivery(session, delivery_id).output_instance_id)
    try:
        delivery = DELIVERIES.retry(session, delivery_id, ("failed", "sent"), now=now, sent_at=None, status_code=None)
    except (LookupError, ValueError) as e:
        raise StorageError(str(e)) from e
    logger.info("delivery %d to %s queued again by request", delivery_id, delivery.peer_name)
    return delivery


def resend_failed(session: Session, peer_name: str | None = None, now: datetime | None = None) -> list[int]:
    """Queue every ``failed`` delivery (to one peer, or to all) again; returns their ids."""
    query = select(Delivery.id).where(Delivery.state == "failed", ~_recalled()).order_by(Delivery.id)
    if peer_name is not None:
        query = query.where(Delivery.peer_name == peer_name)
    ids = list(session.scalars(query))
    for delivery_id in ids:
        resend(session, delivery_id, now=now)
    return ids


def list_deliveries(
    session: Session,
    *,
    state: str | None = None,
    peer_name: str | None = None,
    output_instance_id: int | None = None,
    limit: int = 100,
) -> list[Delivery]:
    """Deliveries, newest first, optionally in one state, to one peer or of one instance."""
    query = select(Delivery).order_by(Delivery.created_at.desc(), Delivery.id.desc()).limit(limit)
    if state is not None:
        if state not in DELIVERY_STATES:
            raise ValueError(f"delivery state {state!r} is not one of {', '.join(DELIVERY_STATES)}")
        query = query.where(Delivery.state == state)
    if peer_name is not None:
        query = query.where(Delivery.peer_name == peer_name)
    if output_instance_id is not None:
        query = query.where(Delivery.output_instance_id == output_instance_id)
    return list(session.scalars(query))
