"""Storage commitment records: which deliveries wait for which Transaction UID, and the answer.

A delivery to a peer with ``storage_commitment = true`` goes ``pending`` -> ``committing`` when its
C-STORE succeeded and the N-ACTION was requested (PS3.4 J.3.2), then ``committed`` when the peer's
N-EVENT-REPORT lists it in the Referenced SOP Sequence (J.3.3). Listed as failed, left out of the
report, or no report before the request's deadline: the delivery is due again (store and request
commitment anew) after a backoff, or ``failed`` once its attempts are used up, like a failed
C-STORE. An attempt is counted when the instance is stored, not again when commitment fails.
Functions flush on the caller's session and leave the commit to the caller.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from storage.db import affected_rows
from storage.models import Delivery, Instance, StorageCommitment, utcnow

logger = logging.getLogger(__name__)

Backoff = Callable[[int], timedelta]
"""The delay before attempt ``n + 1``, given the ``n`` attempts made so far."""


def create_commitment(
    session: Session,
    transaction_uid: str,
    peer_name: str,
    deliveries: Sequence[tuple[int, int]],
    timeout: timedelta,
    now: datetime | None = None,
) -> StorageCommitment:
    """A ``requested`` commitment for ``deliveries`` (id, C-STORE status), each moved from
    ``pending`` to ``committing`` with one more attempt counted."""
    now = now or utcnow()
    commitment = StorageCommitment(
        transaction_uid=transaction_uid,
        peer_name=peer_name,
        state="requested",
        n_instances=len(deliveries),
        requested_at=now,
        deadline=now + timeout,
    )
    session.add(commitment)
    session.flush()
    for delivery_id, status_code in deliveries:
        result = session.execute(
            update(Delivery)
            .where(Delivery.id == delivery_id, Delivery.state == "pending")
            .values(
                state="committing",
                status_code=status_code,
                attempts=Delivery.attempts + 1,
                sent_at=now,
                last_error=None,
                commitment_id=commitment.id,
                # the sender's lease (storage.queue) ends here: committing is not a claimable state
                claimed_by=None,
                claimed_at=None,
                lease_expires_at=None,
                heartbeat_at=None,
            )
            .execution_options(synchronize_session=False)
        )
        if affected_rows(result) != 1:
            raise LookupError(f"delivery {delivery_id} is not pending: cannot await its storage commitment")
    logger.info(
        "storage commitment %s to %s: %d instances, deadline %s", transaction_uid, peer_name, len(deliveries), timeout
    )
    return commitment


def find_commitment(session: Session, transaction_uid: str) -> StorageCommitment | None:
    return session.scalar(select(StorageCommitment).where(StorageCommitment.transaction_uid == transaction_uid))


def committing(session: Session, commitment_id: int) -> list[tuple[Delivery, str, str]]:
    """The deliveries still awaiting this commitment, with their SOP Class and Instance UIDs."""
    rows = session.execute(
        select(Delivery, Instance.sop_class_uid, Instance.sop_instance_uid)
        .join(Instance, Instance.id == Delivery.output_instance_id)
        .where(Delivery.commitment_id == commitment_id, Delivery.state == "committing")
        .order_by(Delivery.id)
    )
    return [(d, sop_class, sop_uid) for d, sop_class, sop_uid in rows]


def _retry(
    session: Session, delivery: Delivery, error: str, backoff: Backoff, max_attempts: int, now: datetime
) -> None:
    """A committing delivery whose commitment did not come: due again after a backoff, or failed."""
    values: dict[str, object] = {"last_error": error[:2000], "commitment_id": None}
    if delivery.attempts < max_attempts:
        values.update(state="pending", not_before=now + backoff(delivery.attempts))
    else:
        values.update(state="failed")
    session.execute(
        update(Delivery)
        .where(Delivery.id == delivery.id, Delivery.state == "committing")
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    logger.warning(
        "delivery %d to %s: %s; %s",
        delivery.id,
        delivery.peer_name,
        error,
        f"retry after {values['not_before'] - now}" if "not_before" in values else "failed for good",  # type: ignore[operator]
    )


def record_report(
    session: Session,
    transaction_uid: str,
    committed: Iterable[str],
    failed: Mapping[str, int | None],
    backoff: Backoff,
    max_attempts: int,
    now: datetime | None = None,
) -> tuple[int, int]:
    """Apply an N-EVENT-REPORT (PS3.4 J.3.3): returns (committed, not committed) delivery counts.

    :class:`LookupError` for an unknown Transaction UID. A report for a commitment already answered
    or expired changes nothing (its deliveries have moved on) and counts (0, 0).
    """
    now = now or utcnow()
    commitment = find_commitment(session, transaction_uid)
    if commitment is None:
        raise LookupError(f"no storage commitment with Transaction UID {transaction_uid}")
    if commitment.state != "requested":
        logger.warning("storage commitment %s: late report ignored (%s)", transaction_uid, commitment.state)
        return 0, 0
    committed = set(committed)
    n_ok = n_failed = 0
    for delivery, _, sop_uid in committing(session, commitment.id):
        if sop_uid in committed and sop_uid not in failed:
            session.execute(
                update(Delivery)
                .where(Delivery.id == delivery.id, Delivery.state == "committing")
                .values(state="committed", committed_at=now)
                .execution_options(synchronize_session=False)
            )
            n_ok += 1
            continue
        reason = failed.get(sop_uid)
        error = (
            f"storage commitment {transaction_uid} failed: Failure Reason 0x{reason:04X}"
            if reason is not None
            else f"storage commitment {transaction_uid}: instance "
            + ("listed as failed" if sop_uid in failed else "missing from the report")
        )
        _retry(session, delivery, error, backoff, max_attempts, now)
        n_failed += 1
    commitment.state = "failed" if n_failed else "committed"
    commitment.n_failed = n_failed
    commitment.answered_at = now
    session.flush()
    logger.info("storage commitment %s: %d committed, %d not", transaction_uid, n_ok, n_failed)
    return n_ok, n_failed


def fail_commitment(
    session: Session, commitment_id: int, reason: str, backoff: Backoff, max_attempts: int, now: datetime | None = None
) -> int:
    """The request itself failed (no association, N-ACTION refused): retry its deliveries."""
    now = now or utcnow()
    commitment = session.get_one(StorageCommitment, commitment_id)
    commitment.state, commitment.reason, commitment.answered_at = "failed", reason[:2000], now
    rows = committing(session, commitment_id)
    for delivery, _, _ in rows:
        _retry(session, delivery, f"storage commitment request failed: {reason}", backoff, max_attempts, now)
    session.flush()
    return len(rows)


def expire_commitments(session: Session, backoff: Backoff, max_attempts: int, now: datetime | None = None) -> int:
    """Requests past their deadline without a report become ``expired``; their deliveries are retried.

    Returns how many deliveries were put back (or failed).
    """
    now = now or utcnow()
    expired = list(
        session.scalars(
            select(StorageCommitment).where(StorageCommitment.state == "requested", StorageCommitment.deadline <= now)
        )
    )
    n = 0
    for commitment in expired:
        commitment.state = "expired"
        commitment.reason = "no N-EVENT-REPORT before the deadline"
        for delivery, _, _ in committing(session, commitment.id):
            error = f"storage commitment {commitment.transaction_uid}: no N-EVENT-REPORT by {commitment.deadline}"
            _retry(session, delivery, error, backoff, max_attempts, now)
            n += 1
    session.flush()
    return n
