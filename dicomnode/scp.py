"""The Storage and Verification SCP: the node's door for radiographs sent by modalities and PACS.

The C-STORE handler is deliberately thin (style practice 3): it checks that the received bytes are a
complete data set of the class the request names, writes them unchanged and durably into the
:class:`~storage.store.InstanceStore`, records the instance (and lets ``intake`` queue jobs) in one
transaction, and only then answers Success. PS3.4 B.2.3 leaves what "stored" means to the SCP; here it
means that the file, its folder entry and the committed row are on stable storage (more than Orthanc's
``SyncStorageArea``, which syncs the file only). Where Linux's ``syncfs`` reports errors that takes one
flush of the filesystem for all the instances committed together (:mod:`storage.durability`), else an
fsync of the file, of its folder and a synchronous commit. Every failure
becomes a status code of PS3.4 Table B.2-1 / PS3.7 Annex C with a short Error Comment, logged once with
the association id; nothing that one peer sends can stop the server from serving the next.

C-STORE statuses (the checks are in :mod:`dicomnode.dataset_checks`; 0xC2xx sub-codes are the node's
own within PS3.4's "Error: Cannot understand" range, 0xC211 being pynetdicom's for a failed handler):

====== ================================================================================================
0x0000 Success: stored and committed, file, folder entry and row flushed to disk; or an identical re-send
0x0111 Duplicate SOP Instance: the UID is held with other content (the original is kept)
0xA700 Out of Resources: disk (free-space watermark, write failure) or database; retry later
0xA900 Data Set does not match SOP Class: request, presentation context and data set name other classes
0xC210 Cannot understand: truncated data set, or a structure that cannot be walked
0xC212 a UID the node relies on (SOP Class/Instance, Study, Series) is missing or invalid
0xC213 SOP Instance UID differs from the request's Affected SOP Instance UID
0xC214 an image storage SOP class without Pixel Data
0xC215 native Pixel Data not Rows x Columns x Samples x Bits Allocated / 8 x Frames bytes (+1 pad)
0xC216 encapsulated Pixel Data under a native transfer syntax, or native under a compressed one
0xC217 encapsulation invalid: no Basic Offset Table item, bad offsets, odd or too few fragments
0xC218 an invalid VR code, an element value that does not convert, or a control character in a value
       the node records
0xC219 the image description (Rows, Columns, Bits Allocated, Samples per Pixel, Frames) is unusable
====== ================================================================================================

Two paths serve associations with the same policy, records and handlers: plain storage associations
(most of them) are served by the node's own Upper Layer code (:mod:`dicomnode.direct_association`),
in this process or in ``node.receive_processes`` receiving processes (:mod:`dicomnode.receivers`);
the rest (TLS, storage commitment, negotiation the direct path does not speak) by pynetdicom.

Association policy (PS3.8 7.1.1): the Called AE Title must be ours when
``security.require_called_ae_title`` is set, the Calling AE Title must be listed in
``security.allowed_calling_ae_titles`` when that list is not empty. pynetdicom does the rejecting
on its path (:meth:`StorageSCP._on_rejected` records and logs why), :meth:`StorageSCP.direct_rejection`
on the direct path. Before that, :mod:`dicomnode.association_gate`
closes connections that send no A-ASSOCIATE-RQ within ``node.request_timeout_s`` (they never take one
of the ``node.max_associations`` slots) and rejects, transient, a peer address already holding
``node.max_associations_per_peer`` associations. Every association, accepted or not, gets a row in
the ``associations`` table, whose id prefixes every log line about it. Every value a peer sent that
reaches the log is escaped (:func:`dicomnode.log_escape.printable`).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, cast

from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.sop_class import StorageCommitmentPushModel, Verification  # type: ignore[attr-defined]
from sqlalchemy.orm import Session, sessionmaker

from dicomnode import commitment, pdu
from dicomnode.association_gate import GatedAssociationServer, RefusedRequest, start_gated_server
from dicomnode.config import Settings
from dicomnode.dataset_checks import (
    CANNOT_UNDERSTAND,
    ERROR_COMMENT_MAX,
    OUT_OF_RESOURCES,
    Refusal,
    check_c_store,
)
from dicomnode.direct_association import DirectAcceptor
from dicomnode.errors import ConfigError, StorageError
from dicomnode.group_commit import GroupCommitter
from dicomnode.log_escape import printable
from dicomnode.part10 import file_header
from dicomnode.pdu_socket import read_pdus_in_bulk
from dicomnode.rules import InstanceFacts
from dicomnode.scp_tls import server_tls_context
from dicomnode.scu import set_tcp_nodelay
from storage.associations import end_association, record_association
from storage.durability import FlushError, ingest_commit
from storage.instances import ReceivedRow, classify_resend, find_instance, insert_received, replace_file
from storage.models import Instance
from storage.store import InstanceStore, PlacedFile, StoredFile

logger = logging.getLogger(__name__)

# What the SCP accepts for every storage SOP class, uncompressed first. Within one presentation
# context the requestor's own order of preference wins (see StorageSCP._on_requested).
TRANSFER_SYNTAXES: tuple[UID, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
)

# C-STORE response statuses (PS3.4 Table B.2-1; 0x0111 from PS3.7 Annex C.5). The failure statuses
# for data sets the node cannot understand, and their sub-codes, are defined with the checks in
# dicomnode.dataset_checks and listed in this module's docstring.
SUCCESS = 0x0000
DUPLICATE_SOP_INSTANCE = 0x0111

Intake = Callable[[Session, ReceivedRow, InstanceFacts], object]
"""Called inside the transaction that records a newly received instance; raising undoes the store.

The facts are the rules' view of the instance's data set (:func:`dicomnode.rules.facts_from_dataset`).
"""

def _status(code: int, comment: str | None = None) -> Dataset:
    """A C-STORE response status, with an Error Comment cut to the 64 characters LO allows."""
    rsp = Dataset()
    rsp.Status = code
    if comment:
        rsp.ErrorComment = comment.replace("\\", "/")[:ERROR_COMMENT_MAX]
    return rsp


class ScpObserver(Protocol):
    """Told of what the SCP answered, on either path (the console's metrics)."""

    def association(self, accepted: bool) -> None: ...

    def c_store(self, status: int, data_set_bytes: int) -> None: ...


# ---- The server -----------------------------------------------------------------------------------


@dataclass
class _AssociationRecord:
    """What the handlers of one accepted association share: its row id and its peer."""

    id: int
    calling_ae: str
    called_ae: str
    peer_host: str
    n_instances: int = 0


def _ae_titles(assoc: Association) -> tuple[str, str]:
    """The Calling and Called AE Titles of the association request, without their padding."""
    request = cast(A_ASSOCIATE, assoc.requestor.primitive)
    return str(request.calling_ae_title).strip(), str(request.called_ae_title).strip()


class StorageSCP:
    """Storage (all storage SOP classes) and Verification SCP on ``settings.node``'s address."""

    def __init__(
        self,
        settings: Settings,
        store: InstanceStore,
        sessions: sessionmaker[Session],
        intake: Intake | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.sessions = sessions
        self.intake = intake
        self._server: GatedAssociationServer | None = None
        self._records: dict[object, _AssociationRecord] = {}  # by association (either path)
        self._lock = threading.Lock()
        self._ingest = ingest_commit(store.root, sessions)
        self._writer = ThreadPoolExecutor(settings.node.max_associations, thread_name_prefix="scp-write")
        self._committer = GroupCommitter(self._ingest.sessions, self._ingest.flush)
        self._ae = self._make_ae()
        self.observers: list[ScpObserver] = []
        self.general_only = frozenset({str(StorageCommitmentPushModel)})  # served by pynetdicom only
        self._direct = DirectAcceptor(
            self,
            {
                str(c.abstract_syntax): tuple(str(ts) for ts in c.transfer_syntax)
                for c in self._ae.supported_contexts
                if str(c.abstract_syntax) not in self.general_only
            },
            (str(self._ae.implementation_class_uid), str(self._ae.implementation_version_name or "")),
        )

    def _make_ae(self) -> AE:
        node, security = self.settings.node, self.settings.security
        ae = AE(ae_title=node.ae_title)
        ae.maximum_associations = node.max_associations
        ae.maximum_pdu_size = node.maximum_pdu_bytes
        ae.acse_timeout = node.acse_timeout_s
        ae.dimse_timeout = node.dimse_timeout_s
        ae.network_timeout = node.network_timeout_s
        ae.require_called_aet = security.require_called_ae_title
        ae.require_calling_aet = list(security.allowed_calling_ae_titles)
        ae.add_supported_context(Verification)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(cast(str, context.abstract_syntax), list(TRANSFER_SYNTAXES))
        # A peer reporting a storage commitment result proposes the SCP role for itself (PS3.4 J.3.3)
        ae.add_supported_context(
            StorageCommitmentPushModel, [ExplicitVRLittleEndian, ImplicitVRLittleEndian], scu_role=True, scp_role=True
        )
        return ae

    @property
    def port(self) -> int:
        """The TCP port the server listens on (the configured one until started)."""
        if self._server is not None:
            return int(self._server.server_address[1])
        return self.settings.node.port

    def start(self) -> None:
        """Listen on ``node.bind_address:node.port`` in background threads and return at once."""
        if self._server is not None:
            raise RuntimeError("the SCP is already running")
        node = self.settings.node
        plain_tcp = not self.settings.security.tls_enabled
        if plain_tcp and node.receive_processes:
            from dicomnode.receivers import ReceiverPool

            self._direct.pool = ReceiverPool(self.settings, node.receive_processes, self._notify)
            self._direct.pool.start()
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, set_tcp_nodelay),
            (evt.EVT_CONN_OPEN, read_pdus_in_bulk),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_closed),
            (evt.EVT_ABORTED, self._on_closed),
            (evt.EVT_CONN_CLOSE, self._on_closed),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_N_EVENT_REPORT, self._on_event_report),
        ]
        try:
            self._server = start_gated_server(
                self._ae,
                (node.bind_address, node.port),
                ssl_context=server_tls_context(self.settings.security),
                evt_handlers=handlers,
                request_timeout_s=node.request_timeout_s,
                max_associations_per_peer=node.max_associations_per_peer,
                on_refused=self._on_refused_at_gate,
                direct=self._direct if plain_tcp else None,
            )
        except OSError as e:
            raise ConfigError(f"node.port: cannot listen on {node.bind_address}:{node.port}: {e}") from e
        logger.info(
            "Storage SCP %s listening on %s:%d%s",
            node.ae_title,
            node.bind_address,
            self.port,
            " (TLS)" if self.settings.security.tls_enabled else "",
        )

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop accepting associations, give running ones ``timeout_s`` to finish, abort the rest.

        Connections that have not even sent an association request are aborted at once: nothing
        of theirs is in flight.
        """
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()  # stops the accept loop and closes the listening socket
        deadline = time.monotonic() + timeout_s
        self._direct.stop(deadline)
        if self._direct.pool is not None:
            self._direct.pool.stop(deadline)
            self._direct.pool = None
        for assoc in [a for a in self._ae.active_associations if a.is_acceptor]:
            requested = assoc.requestor.primitive is not None
            if requested:
                assoc.join(max(0.0, deadline - time.monotonic()))
            if assoc.is_alive():
                if requested:
                    logger.warning("association %s: still running at shutdown, aborting", self.tag(assoc))
                assoc.abort()
        self.close_all("shutdown")
        logger.info("Storage SCP %s stopped", self.settings.node.ae_title)

    def close_all(self, how: str) -> None:
        """Record the end of every association still open, and release the ingest engine."""
        with self._lock:
            leftover = list(self._records)
        for assoc in leftover:
            self.close_record(assoc, how)
        self._writer.shutdown(wait=True)
        self._ingest.close()

    @property
    def direct(self) -> DirectAcceptor:
        """The direct path (:mod:`dicomnode.direct_association`)."""
        return self._direct

    @property
    def listening(self) -> bool:
        """Whether the server is accepting associations (started and not stopped)."""
        return self._server is not None

    def __enter__(self) -> StorageSCP:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- association events ----

    def tag(self, assoc: object) -> str:
        """The association's row id for log lines, or "?" before it has one."""
        with self._lock:
            record = self._records.get(assoc)
        return str(record.id) if record else "?"

    def has_record(self, assoc: object) -> bool:
        with self._lock:
            return assoc in self._records

    def _notify(self, name: str, *args: Any) -> None:
        for observer in self.observers:
            try:
                getattr(observer, name)(*args)
            except Exception:
                logger.exception("SCP observer %r failed", observer)

    def _on_requested(self, event: evt.Event) -> None:
        """Within each proposed context, prefer the transfer syntaxes in the requestor's own order."""
        preferred: dict[str | None, list[str]] = {}
        for context in event.assoc.requestor.requested_contexts:
            preferred.setdefault(context.abstract_syntax, [str(uid) for uid in context.transfer_syntax])
        for context in event.assoc.acceptor.supported_contexts:
            order = preferred.get(context.abstract_syntax)
            if order and len(context.transfer_syntax) > 1:
                rank = {uid: i for i, uid in enumerate(order)}
                context.transfer_syntax = sorted(
                    context.transfer_syntax, key=lambda u: rank.get(str(u), len(rank))
                )

    def _on_accepted(self, event: evt.Event) -> None:
        assoc = event.assoc
        requestor = assoc.requestor
        calling_ae, called_ae = _ae_titles(assoc)
        if not self.open_record(assoc, calling_ae, called_ae, requestor.address, requestor.port):
            assoc.abort()

    def open_record(self, assoc: object, calling_ae: str, called_ae: str, host: str, port: int) -> bool:
        """Record an accepted association (either path); False when it cannot be, and must be aborted."""
        try:
            row = self._committer.run(
                lambda session: record_association(
                    session, calling_ae=calling_ae, called_ae=called_ae, peer_host=host, peer_port=port, accepted=True
                )
            )
        except Exception:
            # Instances could not name their association: refuse the whole association instead.
            logger.exception("association ?: cannot record %s from %s, aborting", printable(calling_ae), host)
            return False
        with self._lock:
            self._records[assoc] = _AssociationRecord(row.id, calling_ae, called_ae, host)
        logger.info(
            "association %d: accepted %s -> %s from %s:%d",
            row.id,
            printable(calling_ae),
            printable(called_ae),
            host,
            port,
        )
        self._notify("association", True)
        return True

    def direct_rejection(self, request: pdu.AssociateRequest) -> tuple[tuple[int, int, int], str] | None:
        """The A-ASSOCIATE-RJ (result, source, reason) and why, for a request on the direct path; or None.

        The same answers pynetdicom gives on the general path, in its order of precedence.
        """
        security, node = self.settings.security, self.settings.node
        if not request.protocol_version & 1:
            return (1, 2, 2), f"protocol version {request.protocol_version} not supported"
        if request.application_context != pdu.APPLICATION_CONTEXT:
            return (1, 1, 2), f"application context {printable(request.application_context, 64)} not supported"
        diagnostic: tuple[int, int, int] | None = None
        allowed = [t.strip() for t in security.allowed_calling_ae_titles]
        if allowed and request.calling_ae not in allowed:
            diagnostic = (1, 1, 3)
        if security.require_called_ae_title and request.called_ae != node.ae_title.strip():
            diagnostic = (1, 1, 7)
        if diagnostic is None:
            return None
        return diagnostic, self._rejection_reason(request.calling_ae, request.called_ae, diagnostic)

    def _rejection_reason(
        self, calling_ae: str, called_ae: str, diagnostic: tuple[int | None, int | None, int | None]
    ) -> str:
        security = self.settings.security
        reasons = []
        allowed = security.allowed_calling_ae_titles
        if allowed and calling_ae not in allowed:
            reasons.append(f"calling AE {calling_ae!r} not in allowed list")
        if security.require_called_ae_title and called_ae != self.settings.node.ae_title:
            reasons.append(f"called AE {called_ae!r} is not {self.settings.node.ae_title!r}")
        if diagnostic == (2, 3, 2):
            reasons.append(f"more than {self.settings.node.max_associations} associations at once")
        result, source, reason = diagnostic
        return "; ".join(reasons) or f"rejected (result {result}, source {source}, reason {reason})"

    def _on_rejected(self, event: evt.Event) -> None:
        requestor = event.assoc.requestor
        calling_ae, called_ae = _ae_titles(event.assoc)
        rj = cast(A_ASSOCIATE, event.assoc.acceptor.primitive)
        reason = self._rejection_reason(calling_ae, called_ae, (rj.result, rj.result_source, rj.diagnostic))
        self.record_rejection(requestor.address, requestor.port, calling_ae, called_ae, reason)

    def _on_refused_at_gate(self, refused: RefusedRequest) -> None:
        """The association gate rejected a request itself (a peer over its per-address cap)."""
        self.record_rejection(
            refused.peer_host, refused.peer_port, refused.calling_ae, refused.called_ae, refused.reason
        )

    def record_rejection(self, host: str, port: int, calling_ae: str, called_ae: str, reason: str) -> None:
        """Record and log a rejected association request (either path, or the gate)."""
        self._notify("association", False)
        row_id = "?"
        try:
            row = self._committer.run(
                lambda session: record_association(
                    session,
                    calling_ae=calling_ae[:16],
                    called_ae=called_ae[:16],
                    peer_host=host,
                    peer_port=port,
                    accepted=False,
                    reason=reason,
                )
            )
            row_id = str(row.id)
        except Exception:
            logger.exception("association ?: cannot record the rejection of %s", host)
        logger.warning("association %s: rejected from %s:%d: %s", row_id, host, port, printable(reason, 256))

    def _on_closed(self, event: evt.Event) -> None:
        how = {"EVT_RELEASED": "released", "EVT_ABORTED": "aborted"}.get(
            event.event.name, "connection closed"
        )
        self.close_record(event.assoc, how)

    def close_record(self, assoc: object, how: str) -> None:
        """Close the association's row once (released, aborted or connection lost, whichever is first)."""
        with self._lock:
            record = self._records.pop(assoc, None)
        if record is None:
            return
        try:
            self._committer.run(lambda session: end_association(session, record.id, n_instances=record.n_instances))
        except Exception:
            logger.exception("association %d: cannot record its end", record.id)
        logger.info("association %d: %s after %d new instances", record.id, how, record.n_instances)

    def _on_echo(self, event: evt.Event) -> int:
        return self.echo_status(event.assoc)

    def echo_status(self, assoc: object) -> int:
        logger.debug("association %s: C-ECHO", self.tag(assoc))
        return SUCCESS

    def _on_event_report(self, event: evt.Event) -> tuple[int, Dataset | None]:
        logger.debug("association %s: N-EVENT-REPORT", self.tag(event.assoc))
        return commitment.on_event_report(self.settings, self.sessions, event)

    # ---- C-STORE ----

    def _on_store(self, event: evt.Event) -> Dataset:
        req = cast(C_STORE, event.request)
        context = event.context
        status, comment = self.store_request(
            event.assoc,
            str(context.abstract_syntax),
            str(context.transfer_syntax),
            str(req.AffectedSOPClassUID or ""),
            str(req.AffectedSOPInstanceUID or ""),
            event.encoded_dataset(include_meta=False),
        )
        return _status(status, comment)

    def store_request(
        self,
        assoc: object,
        abstract_syntax: str,
        transfer_syntax: str,
        sop_class: str,
        sop_instance: str,
        body: bytes | memoryview | None,
    ) -> tuple[int, str | None]:
        """Answer one C-STORE request (either path): its status and Error Comment.

        ``body`` is the data set as received (None: the request had none).
        """
        with self._lock:
            record = self._records.get(assoc)
        comment: str | None
        if record is None:
            status, comment = OUT_OF_RESOURCES, "association not recorded"
        else:
            try:
                if body is None:
                    raise Refusal(CANNOT_UNDERSTAND, "C-STORE request without a data set")
                status, comment = self._store(record, abstract_syntax, transfer_syntax, sop_class, sop_instance, body)
            except Refusal as refusal:
                logger.warning(
                    "association %d: C-STORE of %s refused with 0x%04X: %s",
                    record.id,
                    printable(sop_instance, 64),
                    refusal.status,
                    printable(refusal.reason),
                )
                status, comment = refusal.status, refusal.reason
            except Exception:
                logger.exception("association %d: unexpected error storing %s", record.id, printable(sop_instance, 64))
                status, comment = OUT_OF_RESOURCES, "internal error, see the node log"
        if comment:
            comment = comment.replace("\\", "/")[:ERROR_COMMENT_MAX]
        self._notify("c_store", status, 0 if body is None else len(body))
        return status, comment

    def _store(
        self,
        record: _AssociationRecord,
        abstract_syntax: str,
        transfer_syntax: str,
        sop_class: str,
        sop_instance: str,
        body: bytes | memoryview,
    ) -> tuple[int, str | None]:
        """Check, write durably, record (with intake) in one transaction, then answer Success."""
        header = file_header(sop_class, sop_instance, transfer_syntax)
        # The header and the data set as received, never joined (no copy of the pixels); synced step
        # by step, or flushed with the group after the commit. Written on another thread while this
        # one checks the data set and hashes it: both release the interpreter lock for most of it.
        writing = self._writer.submit(self.store.place, (header, body), sync=self._ingest.flush is None)
        try:
            received = check_c_store(body, UID(transfer_syntax), abstract_syntax, sop_class, sop_instance)
            digest = hashlib.sha256(header)
            digest.update(body)
        except BaseException:
            self._drop(record, writing)  # refused: the file, never acknowledged, must not stay
            raise
        fields = received.fields
        SOPInstanceUID = fields["sop_instance_uid"]
        # No look-up first: a re-sent UID is rare, and the row's unique SOP Instance UID turns it into
        # a failed insert below, answered from the stored row (one query less per instance).
        try:
            placed = writing.result()
        except StorageError as e:
            logger.error("association %d: cannot store %s: %s", record.id, SOPInstanceUID, e)
            return OUT_OF_RESOURCES, "cannot write the instance to storage"
        stored = StoredFile(placed.path, digest.hexdigest(), placed.size_bytes)

        def record_it(session: Session) -> ReceivedRow:
            instance = insert_received(
                session,
                **fields,
                origin="received",
                path=stored.path,
                sha256=stored.sha256,
                size_bytes=stored.size_bytes,
                association_id=record.id,
                calling_ae=record.calling_ae,
                called_ae=record.called_ae,
                peer_host=record.peer_host,
            )
            if self.intake is not None:
                self.intake(session, instance, received.facts)
            return instance

        try:
            # With other associations' records: one commit and one flush for the group.
            self._committer.run(record_it, durable=True)
        except FlushError as e:  # committed, not known to be on disk: a re-send is verified (below)
            logger.error("association %d: %s recorded but not flushed to disk: %s", record.id, SOPInstanceUID, e)
            return OUT_OF_RESOURCES, "cannot flush the instance to disk"
        except Exception:
            with self.sessions() as session:
                existing = find_instance(session, SOPInstanceUID)
            if existing is not None:  # a re-send, or another association stored it meanwhile
                return self._answer_resend(record, existing, stored)
            self._discard(record, stored.path)  # never acknowledged: the file must not stay
            logger.exception("association %d: cannot record %s", record.id, SOPInstanceUID)
            return OUT_OF_RESOURCES, "cannot record the instance"
        with self._lock:
            record.n_instances += 1
        logger.info(
            "association %d: stored %s (%s, %d bytes) as %s",
            record.id,
            SOPInstanceUID,
            fields["transfer_syntax_uid"],
            stored.size_bytes,
            stored.path,
        )
        return SUCCESS, None

    def _answer_resend(
        self, record: _AssociationRecord, existing: Instance, stored: StoredFile
    ) -> tuple[int, str | None]:
        """A re-sent SOP Instance UID: identical bytes are a success, other bytes are refused.

        A UID names one object (PS3.3 C.12.1.1.1): the held original is never replaced
        (``node.duplicate_policy = "reject"``). But a crash before the flush that would have
        acknowledged an instance can leave its row naming a file that is missing or short
        (:mod:`storage.durability`); then the new copy, just written, takes its place. Either way the
        answer is Success only after a flush: the held row may be one whose flush never happened.
        """
        if classify_resend(existing, stored.sha256) != "identical":
            self._discard(record, stored.path)
            logger.warning(
                "association %d: %s re-sent with other content; the original is kept",
                record.id,
                existing.sop_instance_uid,
            )
            return DUPLICATE_SOP_INSTANCE, "SOP Instance UID already stored with other content"
        intact = self._holds(existing)
        try:
            if intact:
                self._discard(record, stored.path)
                self._committer.run(lambda session: None, durable=True)  # flush what the first copy left
            else:
                self._committer.run(
                    lambda session: replace_file(session, existing.id, stored.path, stored.sha256, stored.size_bytes),
                    durable=True,
                )
        except Exception as e:
            logger.error("association %d: cannot make re-sent %s durable: %s", record.id, existing.sop_instance_uid, e)
            return OUT_OF_RESOURCES, "cannot flush the instance to disk"
        if intact:
            logger.info(
                "association %d: %s re-sent with identical content, already stored",
                record.id,
                existing.sop_instance_uid,
            )
        else:
            logger.warning(
                "association %d: %s re-sent; its recorded file %s was missing or damaged, now %s",
                record.id,
                existing.sop_instance_uid,
                existing.path,
                stored.path,
            )
            self._discard(record, existing.path)
        return SUCCESS, None

    def _holds(self, existing: Instance) -> bool:
        """Whether the file ``existing`` names holds its recorded bytes (read only for re-sends)."""
        try:
            data = self.store.read(existing.path)
        except StorageError:
            return False
        return len(data) == existing.size_bytes and hashlib.sha256(data).hexdigest() == existing.sha256

    def _drop(self, record: _AssociationRecord, writing: Future[PlacedFile]) -> None:
        """Remove what ``writing`` wrote, once it has (nothing if the write failed)."""
        try:
            stored = writing.result()
        except Exception:
            return
        self._discard(record, stored.path)

    def _discard(self, record: _AssociationRecord, path: str) -> None:
        try:
            self.store.absolute(path).unlink(missing_ok=True)
        except (OSError, StorageError):
            logger.exception("association %d: cannot remove unrecorded file %s", record.id, path)
