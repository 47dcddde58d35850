"""Sending derived instances to their destinations: one association per (peer, series).

Runs in the node's main process on the scheduler (network work only, no GPU). A C-STORE status
of success or warning (PS3.4 B.2.3: 0x0000, 0xB000, 0xB006, 0xB007) counts as delivered; anything
else, or no association at all, is a failed attempt retried with exponential backoff until
``delivery_max_attempts``, after which the delivery is ``failed`` until `dicomnode deliveries
--resend`. DICOMweb peers get the series by STOW-RS (:mod:`dicomnode.stow`), whose per-instance
results are read the same way; a refusal retrying cannot change (:class:`DeliveryRefused`) fails at
once. Peers with ``storage_commitment`` get an N-ACTION after the series (:mod:`dicomnode.commitment`).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from datetime import timedelta

from sqlalchemy.orm import Session, sessionmaker

from dicomnode import commitment, stow
from dicomnode.config import Settings
from dicomnode.errors import DeliveryError, DeliveryRefused
from dicomnode.scu import send
from dicomnode.worker import backoff_s
from storage.deliveries import due_deliveries, mark_failed, mark_sent
from storage.models import Instance
from storage.store import InstanceStore

logger = logging.getLogger(__name__)

ACCEPTED_STATUSES = frozenset({0x0000, 0xB000, 0xB006, 0xB007})


def deliver_due(settings: Settings, sessions: sessionmaker[Session], store: InstanceStore) -> int:
    """Attempt every due delivery once; returns how many were sent."""
    commitment.expire(settings, sessions)
    with sessions() as session:
        due = [(d.id, d.peer_name, d.attempts, d.output_instance_id) for d in due_deliveries(session)]
        groups: dict[tuple[str, str], list[tuple[int, int, str, str]]] = defaultdict(list)
        for delivery_id, peer_name, attempts, instance_id in due:
            instance = session.get_one(Instance, instance_id)
            key = (peer_name, instance.series_instance_uid)
            groups[key].append((delivery_id, attempts, instance.path, instance.sop_instance_uid))
    sent = 0
    for (peer_name, series_uid), items in groups.items():
        sent += _deliver_series(settings, sessions, store, peer_name, series_uid, items)
    return sent


def _deliver_series(
    settings: Settings,
    sessions: sessionmaker[Session],
    store: InstanceStore,
    peer_name: str,
    series_uid: str,
    items: list[tuple[int, int, str, str]],
) -> int:
    s = settings.scheduler
    try:
        peer = settings.peer(peer_name)
        paths = [store.absolute(path) for _, _, path, _ in items]
        if peer.kind == "dicomweb":
            results = stow.store(peer, paths)
        else:
            results = send(peer, settings.node.ae_title, paths, security=settings.security)
    except Exception as e:  # the whole series failed: no association, unknown peer, unreadable file
        error = str(e) if isinstance(e, DeliveryError) else f"{type(e).__name__}: {e}"
        logger.warning("series %s to %s: %s", series_uid, peer_name, error)
        with sessions.begin() as session:
            for delivery_id, attempts, _, _ in items:
                delay = timedelta(seconds=backoff_s(attempts + 1, s.backoff_initial_s, s.backoff_max_s))
                # a refusal retrying cannot change (bad credentials, HTTP 4xx) fails at once
                max_attempts = attempts + 1 if isinstance(e, DeliveryRefused) else s.delivery_max_attempts
                mark_failed(session, delivery_id, error[:2000], delay, max_attempts)
        return 0
    by_uid = {r.sop_instance_uid: r for r in results}
    sent = 0
    to_commit: list[tuple[int, int]] = []
    with sessions.begin() as session:
        for delivery_id, attempts, _, sop_uid in items:
            result = by_uid.get(sop_uid)
            if result is not None and result.status in ACCEPTED_STATUSES and peer.storage_commitment:
                to_commit.append((delivery_id, int(result.status)))
                sent += 1
                continue
            if result is not None and result.status in ACCEPTED_STATUSES:
                mark_sent(session, delivery_id, int(result.status))
                sent += 1
                continue
            error = (result.error if result else None) or f"status 0x{(result.status if result else 0) or 0:04X}"
            delay = timedelta(seconds=backoff_s(attempts + 1, s.backoff_initial_s, s.backoff_max_s))
            mark_failed(
                session,
                delivery_id,
                error[:2000],
                delay,
                s.delivery_max_attempts,
                status_code=result.status if result else None,
            )
    logger.info("series %s to %s: %d of %d instances delivered", series_uid, peer_name, sent, len(items))
    if to_commit:
        commitment.request(settings, sessions, peer, to_commit)
    return sent

