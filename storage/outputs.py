"""Recording derived outputs: which job, model, weights and settings made each derived instance.

Together with the derived ``Instance`` row this is what lets anyone make the same image again
(same input, model identity, seed, steps, guidance) or find every image a set of weights made.
Functions flush on the caller's session and leave the commit to the caller.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from dicomnode.errors import StorageError
from storage.models import Output

logger = logging.getLogger(__name__)


def record_output(session: Session, **fields: Any) -> Output:
    """Add an ``Output`` row built from ``fields`` (column names) and flush it.

    Raises ``StorageError`` when the row breaks a constraint (the derived instance already has an
    output, the job or instance does not exist); the session must then be rolled back.
    """
    output = Output(**fields)
    session.add(output)
    try:
        session.flush()
    except SQLAlchemyError as e:
        job_id, instance_id = fields.get("job_id"), fields.get("instance_id")
        raise StorageError(
            f"cannot record output of job {job_id!r} for instance {instance_id!r}: {getattr(e, 'orig', e)}"
        ) from e
    logger.debug("job %d: output %d recorded (instance %d)", output.job_id, output.id, output.instance_id)
    return output


def outputs_of_job(session: Session, job_id: int) -> list[Output]:
    """The outputs a job has recorded so far, in the order they were made."""
    return list(session.scalars(select(Output).where(Output.job_id == job_id).order_by(Output.id)))
