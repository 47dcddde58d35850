"""Recording the associations peers open to us, so every received instance names its sender.

Like the other query modules, these functions flush on the caller's ``Session`` and leave the
commit to the caller.
"""

from __future__ import annotations

import logging
from datetime import datetime

from sqlalchemy.orm import Session

from dicomnode.errors import StorageError
from storage.models import Association, utcnow

logger = logging.getLogger(__name__)


def record_association(
    session: Session,
    *,
    calling_ae: str,
    called_ae: str,
    peer_host: str,
    peer_port: int,
    accepted: bool,
    reason: str | None = None,
    started_at: datetime | None = None,
) -> Association:
    """Add a row for an association as it is accepted or rejected (with ``reason`` why)."""
    assoc = Association(
        calling_ae=calling_ae,
        called_ae=called_ae,
        peer_host=peer_host,
        peer_port=peer_port,
        accepted=accepted,
        reason=reason,
        started_at=started_at or utcnow(),
        n_instances=0,
    )
    session.add(assoc)
    session.flush()
    logger.debug("association %d from %s:%d recorded (accepted=%s)", assoc.id, peer_host, peer_port, accepted)
    return assoc


def end_association(
    session: Session, association_id: int, *, n_instances: int, ended_at: datetime | None = None
) -> Association:
    """Close the association's row with the number of instances it stored."""
    assoc = session.get(Association, association_id)
    if assoc is None:
        raise StorageError(f"association {association_id} is not recorded")
    assoc.ended_at = ended_at or utcnow()
    assoc.n_instances = n_instances
    session.flush()
    return assoc
