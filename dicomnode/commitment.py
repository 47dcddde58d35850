"""Storage Commitment Push Model, SCU side (PS3.4 Annex J): ask a peer to commit what we stored.

After a series was C-STOREd to a peer with ``storage_commitment = true``, the node sends one
N-ACTION (Action Type ID 1, PS3.4 J.3.2) to the well-known SOP Instance 1.2.840.10008.1.20.1.1 with a
fresh Transaction UID and the Referenced SOP Sequence of the stored instances, and records them as
``committing`` (``storage.commitments``). The peer answers with an N-EVENT-REPORT (J.3.3): Event Type
ID 1 when all are committed, 2 when some failed (Failed SOP Sequence, each with a Failure Reason). The
report may come on the same association, which the node waits :data:`SAME_ASSOCIATION_WAIT_S` for,
or on a new association the peer opens to the node's own SCP (the peer acting as SCP by role
selection, J.3.3 and PS3.7 D.3.3.4), where :func:`on_event_report` takes it. A report that never
comes leaves the deliveries ``committing`` until ``commitment_timeout_s``; then they are retried.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import cast

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import evt
from pynetdicom.dimse_primitives import N_EVENT_REPORT
from pynetdicom.sop_class import StorageCommitmentPushModel  # type: ignore[attr-defined]
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.config import PeerSettings, SchedulerSettings, SecuritySettings, Settings
from dicomnode.errors import DeliveryError
from dicomnode.scu import _associate
from storage.commitments import (
    Backoff,
    committing,
    create_commitment,
    expire_commitments,
    fail_commitment,
    record_report,
)
from storage.queue import RetryPolicy

logger = logging.getLogger(__name__)

STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"  # the well-known SOP Instance (PS3.4 J.3.1)
REQUEST_COMMITMENT = 1  # Action Type ID (PS3.4 Table J.3-1)
ALL_COMMITTED, SOME_FAILED = 1, 2  # Event Type IDs (PS3.4 Table J.3-2)
SAME_ASSOCIATION_WAIT_S = 1.0
PROCESSING_FAILURE = 0x0110
NO_SUCH_EVENT_TYPE = 0x0113
CONTEXT: tuple[str, list[str]] = (StorageCommitmentPushModel, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])


@dataclass(frozen=True)
class CommitmentReport:
    """One N-EVENT-REPORT's content: committed SOP Instance UIDs, failed ones with Failure Reason."""

    TransactionUID: str
    committed: tuple[str, ...] = ()
    failed: Mapping[str, int | None] = field(default_factory=dict)


def action_request(TransactionUID: str, items: Sequence[tuple[str, str]]) -> Dataset:
    """The N-ACTION information (PS3.4 Table J.3-1) for (SOP Class UID, SOP Instance UID) pairs."""
    ds = Dataset()
    ds.TransactionUID = TransactionUID
    references = []
    for SOPClassUID, SOPInstanceUID in items:
        item = Dataset()
        item.ReferencedSOPClassUID = SOPClassUID
        item.ReferencedSOPInstanceUID = SOPInstanceUID
        references.append(item)
    ds.ReferencedSOPSequence = references
    return ds


def parse_report(EventTypeID: int, info: Dataset) -> CommitmentReport:
    """The content of an N-EVENT-REPORT (PS3.4 Table J.3-2); ValueError when it is not one."""
    if EventTypeID not in (ALL_COMMITTED, SOME_FAILED):
        raise ValueError(f"Event Type ID {EventTypeID} is not a storage commitment result")
    uid = str(info.get("TransactionUID", ""))
    if not uid:
        raise ValueError("the report has no Transaction UID")
    committed = tuple(str(i.ReferencedSOPInstanceUID) for i in info.get("ReferencedSOPSequence", []))
    failed = {
        str(i.ReferencedSOPInstanceUID): (int(i.FailureReason) if "FailureReason" in i else None)
        for i in info.get("FailedSOPSequence", [])
    }
    return CommitmentReport(uid, committed, failed)


def backoff_policy(s: SchedulerSettings) -> Backoff:
    """The delivery backoff, as a delay after ``n`` attempts made (the deliveries' :class:`RetryPolicy`)."""
    policy = RetryPolicy(s.delivery_max_attempts, s.backoff_initial_s, s.backoff_max_s, s.backoff_jitter)
    return policy.backoff


def send_action(
    peer: PeerSettings,
    calling_ae: str,
    request: Dataset,
    timeout_s: float = 30,
    *,
    security: SecuritySettings | None = None,
    wait_s: float = SAME_ASSOCIATION_WAIT_S,
) -> CommitmentReport | None:
    """Send the N-ACTION; return the report if the peer sent it on this association within ``wait_s``.

    :class:`DeliveryError` when there is no association or the peer does not answer Success.
    """
    assoc = _associate(peer, calling_ae, [CONTEXT], timeout_s, security)
    reports: list[CommitmentReport] = []
    arrived = threading.Event()

    def on_report(event: evt.Event) -> tuple[int, Dataset | None]:
        try:
            request = cast(N_EVENT_REPORT, event.request)
            reports.append(parse_report(int(request.EventTypeID or 0), event.event_information))
        except ValueError as e:
            logger.warning("peer %s: unusable N-EVENT-REPORT: %s", peer.name, e)
            return NO_SUCH_EVENT_TYPE, None
        arrived.set()
        return 0x0000, None

    assoc.bind(evt.EVT_N_EVENT_REPORT, on_report)
    try:
        status, _ = assoc.send_n_action(
            request, REQUEST_COMMITMENT, StorageCommitmentPushModel, STORAGE_COMMITMENT_INSTANCE
        )
        if "Status" not in status:
            raise DeliveryError(f"peer {peer.name}: no N-ACTION response within {timeout_s:g} s")
        if int(status.Status) != 0x0000:
            raise DeliveryError(f"peer {peer.name}: storage commitment N-ACTION status 0x{int(status.Status):04X}")
        arrived.wait(wait_s)
    finally:
        if assoc.is_established:
            assoc.release()
    return reports[0] if reports else None


def record(settings: Settings, sessions: sessionmaker[Session], report: CommitmentReport) -> tuple[int, int]:
    """Apply a report to the deliveries it concerns; (committed, not committed)."""
    with sessions.begin() as session:
        return record_report(
            session,
            report.TransactionUID,
            report.committed,
            report.failed,
            backoff_policy(settings.scheduler),
            settings.scheduler.delivery_max_attempts,
        )


def request(
    settings: Settings, sessions: sessionmaker[Session], peer: PeerSettings, stored: Sequence[tuple[int, int]]
) -> str:
    """Ask ``peer`` to commit the instances of the ``stored`` deliveries (id, C-STORE status).

    The deliveries are ``committing`` before the N-ACTION goes out, so a report arriving at once on
    the node's SCP finds them. Returns the Transaction UID. A failed request retries them.
    """
    TransactionUID = generate_uid()
    timeout = timedelta(seconds=peer.commitment_timeout_s)
    with sessions.begin() as session:
        commitment = create_commitment(session, TransactionUID, peer.name, stored, timeout)
        commitment_id = commitment.id
        items = [(sop_class, sop_uid) for _, sop_class, sop_uid in committing(session, commitment_id)]
    try:
        report = send_action(
            peer, settings.node.ae_title, action_request(TransactionUID, items), security=settings.security
        )
    except DeliveryError as e:
        logger.warning("storage commitment %s to %s: %s", TransactionUID, peer.name, e)
        with sessions.begin() as session:
            s = settings.scheduler
            fail_commitment(session, commitment_id, str(e), backoff_policy(s), s.delivery_max_attempts)
        return TransactionUID
    if report is not None:
        logger.info("storage commitment %s: report on the same association", TransactionUID)
        record(settings, sessions, report)
    return TransactionUID


def expire(settings: Settings, sessions: sessionmaker[Session]) -> int:
    """Retry the deliveries of commitment requests past their deadline; how many."""
    with sessions.begin() as session:
        return expire_commitments(session, backoff_policy(settings.scheduler), settings.scheduler.delivery_max_attempts)


def on_event_report(
    settings: Settings, sessions: sessionmaker[Session], event: evt.Event
) -> tuple[int, Dataset | None]:
    """EVT_N_EVENT_REPORT handler of the node's SCP: a peer reports a commitment result (PS3.4 J.3.3).

    pynetdicom serves an N-EVENT-REPORT on a thread of its own at once, even while the SCP's
    EVT_ACCEPTED handler (which writes the association row) still runs, and drops the response if the
    association is not marked established when the handler returns: wait for that first.
    """
    deadline = time.monotonic() + settings.node.acse_timeout_s
    while not event.assoc.is_established and time.monotonic() < deadline and not event.assoc.is_aborted:
        time.sleep(0.01)
    calling = str(event.assoc.requestor.ae_title).strip()
    request = cast(N_EVENT_REPORT, event.request)
    if str(request.AffectedSOPClassUID) != StorageCommitmentPushModel:
        logger.warning("N-EVENT-REPORT from %s for SOP Class %s refused", calling, request.AffectedSOPClassUID)
        return PROCESSING_FAILURE, None
    try:
        report = parse_report(int(request.EventTypeID or 0), event.event_information)
    except ValueError as e:
        logger.warning("N-EVENT-REPORT from %s refused: %s", calling, e)
        return NO_SUCH_EVENT_TYPE, None
    except Exception:
        logger.exception("N-EVENT-REPORT from %s cannot be decoded", calling)
        return PROCESSING_FAILURE, None
    try:
        committed, failed = record(settings, sessions, report)
    except LookupError as e:
        logger.warning("N-EVENT-REPORT from %s: %s", calling, e)
        return 0x0000, None  # nothing of ours waits for it; the peer did its part
    except Exception:
        logger.exception("N-EVENT-REPORT from %s: cannot record %s", calling, report.TransactionUID)
        return PROCESSING_FAILURE, None
    logger.info(
        "storage commitment %s reported by %s: %d committed, %d not", report.TransactionUID, calling, committed, failed
    )
    return 0x0000, None
