"""Recalls: derived outputs withdrawn by a rejection note, and the marks that keep them from going out again.

A recall row names the rejection note (a Key Object Selection Document, IHE IOCM) written for one
study, why (``quality`` or ``safety``), how the outputs were chosen and by whom. Each recalled
``Output`` points at its recall; from then on no delivery of its instance is due, created or
resent, and its pending or failed deliveries are ``cancelled``. Functions flush on the caller's
session and leave the commit to the caller.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from dicomnode.errors import StorageError
from storage.db import affected_rows
from storage.models import Delivery, Output, Recall, utcnow

logger = logging.getLogger(__name__)

# Delivery states a recall ends: anything that could still send the instance.
CANCELLED_FROM: tuple[str, ...] = ("pending", "failed")


def recall_of_instance(session: Session, instance_id: int) -> int | None:
    """The id of the recall that withdrew this derived instance, or None if it is not recalled."""
    return session.scalars(
        select(Output.recall_id).where(Output.instance_id == instance_id, Output.recall_id.is_not(None))
    ).first()


def recalled_instance_ids(session: Session, instance_ids: Collection[int]) -> set[int]:
    """Those of ``instance_ids`` whose output has been recalled."""
    if not instance_ids:
        return set()
    return set(
        session.scalars(
            select(Output.instance_id).where(Output.instance_id.in_(list(instance_ids)), Output.recall_id.is_not(None))
        )
    )


def record_recall(
    session: Session,
    *,
    reason: str,
    selector: str,
    requested_by: str,
    study_instance_uid: str,
    note_instance_id: int,
    output_ids: Sequence[int],
    now: datetime | None = None,
) -> Recall:
    """Record one recall, mark its outputs recalled and cancel their undelivered deliveries.

    Refuses (``StorageError``) when an output does not exist or is already recalled: each output
    is withdrawn by exactly one note.
    """
    if not output_ids:
        raise StorageError("a recall needs at least one output")
    now = now or utcnow()
    recall = Recall(
        reason=reason,
        selector=selector[:255],
        requested_by=requested_by[:128],
        requested_at=now,
        study_instance_uid=study_instance_uid,
        note_instance_id=note_instance_id,
        n_outputs=len(output_ids),
    )
    session.add(recall)
    try:
        session.flush()
    except SQLAlchemyError as e:
        raise StorageError(f"cannot record the recall of study {study_instance_uid}: {getattr(e, 'orig', e)}") from e
    marked = session.execute(
        update(Output)
        .where(Output.id.in_(list(output_ids)), Output.recall_id.is_(None))
        .values(recall_id=recall.id, recalled_at=now)
        .execution_options(synchronize_session=False)
    )
    if affected_rows(marked) != len(set(output_ids)):
        raise StorageError(f"outputs {sorted(output_ids)} are not all present and not yet recalled")
    instance_ids = select(Output.instance_id).where(Output.recall_id == recall.id)
    cancelled = session.execute(
        update(Delivery)
        .where(Delivery.output_instance_id.in_(instance_ids), Delivery.state.in_(CANCELLED_FROM))
        .values(state="cancelled", last_error=f"recalled (recall {recall.id}, {reason}); never sent again")
        .execution_options(synchronize_session=False)
    )
    session.expire_all()
    logger.info(
        "recall %d (%s) of %d outputs in study %s: %d undelivered deliveries cancelled",
        recall.id,
        reason,
        len(output_ids),
        study_instance_uid,
        affected_rows(cancelled),
    )
    return recall


def recalls_by_id(session: Session, recall_ids: Collection[int]) -> dict[int, Recall]:
    """The recalls with these ids."""
    if not recall_ids:
        return {}
    return {r.id: r for r in session.scalars(select(Recall).where(Recall.id.in_(list(recall_ids))))}
