"""The audit trail: every state-changing action taken through the console or its API.

Each row says who (the user, ``token`` or ``local``), what (action and target), when, from where
(the client address) and how it ended. No patient data goes into it: targets are row ids and peer
names.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from storage.models import AuditEvent

logger = logging.getLogger(__name__)


def record(
    sessions: sessionmaker[Session],
    *,
    actor: str,
    remote_addr: str | None,
    action: str,
    target: str | None,
    outcome: str,
    detail: dict[str, Any] | None = None,
) -> int:
    """Write one audit row in its own transaction and return its id."""
    with sessions.begin() as session:
        event = AuditEvent(
            actor=actor, remote_addr=remote_addr, action=action, target=target, outcome=outcome, detail=detail
        )
        session.add(event)
        session.flush()
        event_id = event.id
    logger.info("audit %d: %s by %s from %s on %s: %s", event_id, action, actor, remote_addr, target, outcome)
    return event_id


def recent(session: Session, limit: int = 200) -> list[dict[str, Any]]:
    """The newest audit rows first, as plain dicts."""
    rows = session.scalars(select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit))
    return [
        {
            "id": e.id,
            "at": e.at,
            "actor": e.actor,
            "remote_addr": e.remote_addr,
            "action": e.action,
            "target": e.target,
            "outcome": e.outcome,
            "detail": e.detail,
        }
        for e in rows
    ]
