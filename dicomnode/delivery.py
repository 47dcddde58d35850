"""Sending derived instances to their destinations: one association per (peer, series).

Runs on the scheduler of every node that delivers (role ``all`` or ``edge``; network work only, no
GPU). A C-STORE status of success or warning (PS3.4 B.2.3: 0x0000, 0xB000, 0xB006, 0xB007) counts as
delivered; anything else, or no association at all, is a failed attempt retried with exponential
backoff until ``delivery_max_attempts``, after which the delivery is ``failed`` until `dicomnode
deliveries --resend`. DICOMweb peers get the series by STOW-RS (:mod:`dicomnode.stow`), whose
per-instance results are read the same way; a refusal retrying cannot change
(:class:`DeliveryRefused`) fails at once. Peers with ``storage_commitment`` get an N-ACTION after the
series (:mod:`dicomnode.commitment`): their deliveries are ``committing`` until the peer's
N-EVENT-REPORT makes them ``committed``.

Deliveries are claimed with a lease before any association opens (:mod:`storage.queue`), so two
nodes sharing one database never send the same instance; outcomes are written fenced by that
lease, and a sender whose lease was taken over logs it and records nothing.
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
from storage.deliveries import claim_deliveries, mark_failed, mark_sent
from storage.models import Instance
from storage.queue import Lease, LeaseLost, RetryPolicy
from storage.store import InstanceStore

logger = logging.getLogger(__name__)

ACCEPTED_STATUSES = frozenset({0x0000, 0xB000, 0xB006, 0xB007})


def delivery_policy(settings: Settings) -> RetryPolicy:
    """The retry policy of deliveries, from ``[scheduler]``."""
    s = settings.scheduler
    return RetryPolicy(s.delivery_max_attempts, s.backoff_initial_s, s.backoff_max_s, s.backoff_jitter)


def deliver_due(
    settings: Settings, sessions: sessionmaker[Session], store: InstanceStore, sender_id: str | None = None
) -> int:
    """Claim the due deliveries (with a lease), attempt each once; returns how many were sent."""
    commitment.expire(settings, sessions)
    sender_id = sender_id or f"{settings.node.ae_title.strip()}/delivery"
    # The lease outlives the longest the sends can take, so a live sender is never reclaimed.
    lease_s = max(settings.scheduler.lease_s, 3 * settings.node.network_timeout_s)
    claimed = claim_deliveries(sessions, sender_id, limit=100, lease_s=lease_s)
    if not claimed:
        return 0
    groups: dict[tuple[str, str], list[tuple[Lease, int, str, str]]] = defaultdict(list)
    with sessions() as session:
        for delivery, lease in claimed:
            instance = session.get_one(Instance, delivery.output_instance_id)
            key = (delivery.peer_name, instance.series_instance_uid)
            groups[key].append((lease, delivery.attempts, instance.path, instance.sop_instance_uid))
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
    items: list[tuple[Lease, int, str, str]],
) -> int:
    s = settings.scheduler
    policy = delivery_policy(settings)
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
        for lease, attempts, _, _ in items:
            # a refusal retrying cannot change (bad credentials, HTTP 4xx) fails at once
            max_attempts = attempts + 1 if isinstance(e, DeliveryRefused) else s.delivery_max_attempts
            _record(sessions, lease, error, None, policy.backoff(attempts + 1), max_attempts)
        return 0
    by_uid = {r.sop_instance_uid: r for r in results}
    sent = 0
    to_commit: list[tuple[int, int]] = []
    for lease, attempts, _, sop_uid in items:
        result = by_uid.get(sop_uid)
        if result is not None and result.status in ACCEPTED_STATUSES and peer.storage_commitment:
            to_commit.append((lease.id, int(result.status)))  # still held: committing takes it over
            sent += 1
            continue
        if result is not None and result.status in ACCEPTED_STATUSES:
            sent += _record(sessions, lease, None, int(result.status))
            continue
        error = (result.error if result else None) or f"status 0x{(result.status if result else 0) or 0:04X}"
        code = result.status if result else None
        _record(sessions, lease, error, code, policy.backoff(attempts + 1), s.delivery_max_attempts)
    logger.info("series %s to %s: %d of %d instances delivered", series_uid, peer_name, sent, len(items))
    if to_commit:
        commitment.request(settings, sessions, peer, to_commit)
    return sent


def _record(
    sessions: sessionmaker[Session],
    lease: Lease,
    error: str | None,
    status: int | None,
    backoff: timedelta = timedelta(0),
    max_attempts: int = 1,
) -> bool:
    """Record one delivery's outcome (sent when ``error`` is None) in its own transaction, fenced by
    its lease; False when the lease was lost (another node holds the delivery now)."""
    try:
        with sessions.begin() as session:
            if error is None:
                assert status is not None
                mark_sent(session, lease.id, status, lease=lease)
            else:
                mark_failed(session, lease.id, error[:2000], backoff, max_attempts, status_code=status, lease=lease)
    except LeaseLost as e:
        logger.warning("delivery %d: outcome not recorded: %s", lease.id, e)
        return False
    return error is None
