"""The Storage and Verification SCP: the node's door for radiographs sent by modalities and PACS.

The C-STORE handler is deliberately thin (style practice 3): it checks that the received bytes are a
complete data set of the class the request names, writes them unchanged and durably into the
:class:`~storage.store.InstanceStore`, records the instance (and lets ``intake`` queue jobs) in one
transaction, and only then answers Success. PS3.4 B.2.3 leaves what "stored" means to the SCP; here it
means on disk, fsynced and committed, the bar Orthanc's ``SyncStorageArea`` sets. Every failure
becomes a status code of PS3.4 Table B.2-1 / PS3.7 Annex C with a short Error Comment; nothing that
one peer sends can stop the server from serving the next.

Association policy (PS3.8 7.1.1): the Called AE Title must be ours when
``security.require_called_ae_title`` is set, the Calling AE Title must be listed in
``security.allowed_calling_ae_titles`` when that list is not empty. pynetdicom does the rejecting;
:meth:`StorageSCP._on_rejected` records and logs why. Every association, accepted or not, gets a row in
the ``associations`` table, whose id prefixes every log line about it.
"""

from __future__ import annotations

import hashlib
import io
import logging
import ssl
import struct
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    RE_VALID_UID,
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
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy.orm import Session, sessionmaker

from dicomnode import commitment
from dicomnode.config import SecuritySettings, Settings
from dicomnode.errors import ConfigError, DicomInputError, StorageError
from dicomnode.scu import set_tcp_nodelay
from storage.associations import end_association, record_association
from storage.instances import classify_resend, fields_from_dataset, find_instance, record_instance
from storage.models import Instance
from storage.store import InstanceStore

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

# C-STORE response statuses (PS3.4 Table B.2-1; 0x0111 from PS3.7 Annex C.5).
SUCCESS = 0x0000
DUPLICATE_SOP_INSTANCE = 0x0111
OUT_OF_RESOURCES = 0xA700
DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
# "Error: Cannot understand" is the range 0xCxxx. pynetdicom answers 0xC211 itself when a handler
# raises, so our own reasons use other codes of that range.
CANNOT_UNDERSTAND = 0xC210  # the data set is truncated or cannot be parsed
INVALID_UID = 0xC212  # a UID the node relies on is missing or not a valid UID
SOP_INSTANCE_MISMATCH = 0xC213  # SOP Instance UID differs from the Affected SOP Instance UID
ERROR_COMMENT_MAX = 64  # Error Comment (0000,0902) is LO

Intake = Callable[[Session, Instance, Dataset], object]
"""Called inside the transaction that records a newly received instance; raising undoes the store.

The dataset holds everything but Pixel Data (it is parsed with ``stop_before_pixels``).
"""

_UID_KEYWORDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


def _status(code: int, comment: str | None = None) -> Dataset:
    """A C-STORE response status, with an Error Comment cut to the 64 characters LO allows."""
    rsp = Dataset()
    rsp.Status = code
    if comment:
        rsp.ErrorComment = comment.replace("\\", "/")[:ERROR_COMMENT_MAX]
    return rsp


# ---- Is the data set complete? --------------------------------------------------------------------
# pydicom reads a truncated value as a shorter one without complaint, so the handler walks the
# element headers itself (PS3.5 7.1 and 7.5): every declared length must fit in the received bytes and
# every undefined-length sequence or encapsulated Pixel Data must reach its delimiter.

_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_UNDEFINED_LENGTH = 0xFFFFFFFF
_ITEM, _ITEM_DELIMITER, _SEQUENCE_DELIMITER = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD


def _truncated(pos: int, what: str) -> DicomInputError:
    return DicomInputError(f"data set truncated at byte {pos} ({what})")


def _walk_elements(buf: bytes, pos: int, implicit: bool, order: str, in_item: bool) -> int:
    """Skip data elements from ``pos``; inside an undefined-length item stop after its delimiter."""
    end = len(buf)
    while pos < end:
        if pos + 8 > end:
            if not in_item and pos > 0 and not any(buf[pos:]):
                return end  # a few bytes of trailing zero padding, as some senders add
            raise _truncated(pos, "element header")
        group, element = struct.unpack_from(order + "HH", buf, pos)
        tag = group << 16 | element
        if tag == _ITEM_DELIMITER and in_item:
            return pos + 8
        vr = buf[pos + 4 : pos + 6]
        if implicit or group == 0xFFFE:
            (length,), pos = struct.unpack_from(order + "L", buf, pos + 4), pos + 8
        elif vr in _LONG_VRS:
            if pos + 12 > end:
                raise _truncated(pos, "element header")
            (length,), pos = struct.unpack_from(order + "L", buf, pos + 8), pos + 12
        else:
            (length,), pos = struct.unpack_from(order + "H", buf, pos + 6), pos + 8
        if length == _UNDEFINED_LENGTH:
            # Items of an undefined-length UN value are Implicit VR Little Endian (PS3.5 6.2.2).
            pos = _walk_items(buf, pos, implicit or vr == b"UN", order, tag)
        elif pos + length > end:
            raise _truncated(pos, f"value of ({group:04X},{element:04X}) needs {length} bytes")
        else:
            pos += length
    if in_item:
        raise _truncated(pos, "no item delimiter")
    return pos


def _walk_items(buf: bytes, pos: int, implicit: bool, order: str, parent: int) -> int:
    """Skip the items of an undefined-length value up to and including its sequence delimiter."""
    while pos + 8 <= len(buf):
        group, element, length = struct.unpack_from(order + "HHL", buf, pos)
        tag, pos = group << 16 | element, pos + 8
        if tag == _SEQUENCE_DELIMITER:
            return pos
        if tag != _ITEM:
            raise DicomInputError(f"({group:04X},{element:04X}) where an item of {parent:08X} belongs")
        if length == _UNDEFINED_LENGTH:
            pos = _walk_elements(buf, pos, implicit, order, in_item=True)
        elif pos + length > len(buf):
            raise _truncated(pos, f"item of {parent:08X} needs {length} bytes")
        else:
            pos += length
    raise _truncated(pos, f"no sequence delimiter for {parent:08X}")


def check_complete(body: bytes, transfer_syntax: UID) -> None:
    """Raise :class:`DicomInputError` unless ``body`` is a whole data set encoded in ``transfer_syntax``.

    Only element headers are read: no value is decoded, pixel data least of all.
    """
    if transfer_syntax.is_deflated:
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)  # PS3.5 A.5: raw deflate, no zlib header
        try:
            body = inflater.decompress(body) + inflater.flush()
        except zlib.error as e:
            raise DicomInputError(f"deflated data set cannot be inflated: {e}") from e
        if not inflater.eof:
            raise DicomInputError("deflated data set truncated (deflate stream has no end)")
    order = "<" if transfer_syntax.is_little_endian else ">"
    _walk_elements(body, 0, transfer_syntax.is_implicit_VR, order, in_item=False)


def _valid_uid(value: object) -> bool:
    """A UID per PS3.5 9.1: at most 64 characters, digits and dots, no leading zeros."""
    return isinstance(value, str) and len(value) <= 64 and RE_VALID_UID.match(value) is not None


class _Refused(Exception):
    """A C-STORE the handler answers with ``status`` (and ``reason`` as Error Comment)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _validate(event: evt.Event, data: bytes) -> tuple[Dataset, dict[str, Any]]:
    """The received data set parsed up to Pixel Data, and its ``instances`` columns; or _Refused.

    Checks that it is whole, parses, carries valid UIDs and is the object the request names (PS3.4
    B.2.3: another SOP Class is 0xA900 "Data Set does not match SOP Class").
    """
    req = cast(C_STORE, event.request)
    try:
        check_complete(event.encoded_dataset(include_meta=False), UID(event.context.transfer_syntax))
        ds = dcmread(io.BytesIO(data), stop_before_pixels=True)
        values = {keyword: ds.get(keyword) for keyword in _UID_KEYWORDS}  # converts lazily: fail here
    except DicomInputError as e:
        raise _Refused(CANNOT_UNDERSTAND, str(e)) from e
    except Exception as e:  # whatever pydicom raises on bytes it cannot read
        raise _Refused(CANNOT_UNDERSTAND, f"cannot parse data set: {type(e).__name__}") from e
    for keyword, value in values.items():
        if not _valid_uid(value):
            state = "missing" if keyword not in ds else f"invalid ({str(value)[:20]!r})"
            raise _Refused(INVALID_UID, f"{keyword} {state}")
    if ds.SOPClassUID != req.AffectedSOPClassUID:
        raise _Refused(DATA_SET_DOES_NOT_MATCH_SOP_CLASS, f"SOP Class UID is {ds.SOPClassUID}")
    if ds.SOPInstanceUID != req.AffectedSOPInstanceUID:
        raise _Refused(SOP_INSTANCE_MISMATCH, "SOP Instance UID differs from the request's")
    try:
        return ds, fields_from_dataset(ds)
    except DicomInputError as e:
        raise _Refused(CANNOT_UNDERSTAND, str(e)) from e


# ---- TLS ------------------------------------------------------------------------------------------


class _HandshakeInAssociationThread(ssl.SSLContext):
    """Server sockets that do the TLS handshake on their first read, not in ``wrap_socket``.

    pynetdicom wraps each accepted socket in its single accept thread, so with the default eager
    handshake one peer that connects and stays silent would stall every other association.
    """

    def wrap_socket(self, sock: Any, *args: Any, **kwargs: Any) -> ssl.SSLSocket:  # type: ignore[override]
        kwargs["do_handshake_on_connect"] = False
        return super().wrap_socket(sock, *args, **kwargs)


def server_tls_context(security: SecuritySettings) -> ssl.SSLContext | None:
    """The SCP's TLS context (PS3.15 B.1, TLS 1.2 or later), or None when TLS is not configured.

    With ``tls_ca_certificates`` set, calling nodes must present a certificate signed by that CA.
    """
    if security.tls_certificate is None or security.tls_private_key is None:
        return None
    context = _HandshakeInAssociationThread(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(security.tls_certificate, security.tls_private_key)
        if security.tls_ca_certificates is not None:
            context.load_verify_locations(cafile=security.tls_ca_certificates)
            context.verify_mode = ssl.CERT_REQUIRED
    except (ssl.SSLError, OSError) as e:
        raise ConfigError(
            f"security.tls_certificate: cannot load {security.tls_certificate} / "
            f"{security.tls_private_key} / {security.tls_ca_certificates}: {e}"
        ) from e
    return context


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
        self._server: ThreadedAssociationServer | None = None
        self._records: dict[Association, _AssociationRecord] = {}
        self._lock = threading.Lock()
        self._ae = self._make_ae()

    def _make_ae(self) -> AE:
        node, security = self.settings.node, self.settings.security
        ae = AE(ae_title=node.ae_title)
        ae.maximum_associations = node.max_associations
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
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, set_tcp_nodelay),
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
            self._server = self._ae.start_server(
                (node.bind_address, node.port),
                block=False,
                ssl_context=server_tls_context(self.settings.security),
                evt_handlers=handlers,
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
        for assoc in [a for a in self._ae.active_associations if a.is_acceptor]:
            requested = assoc.requestor.primitive is not None
            if requested:
                assoc.join(max(0.0, deadline - time.monotonic()))
            if assoc.is_alive():
                if requested:
                    logger.warning("association %s: still running at shutdown, aborting", self._tag(assoc))
                assoc.abort()
        with self._lock:
            leftover = list(self._records)
        for assoc in leftover:
            self._finish(assoc, "shutdown")
        logger.info("Storage SCP %s stopped", self.settings.node.ae_title)

    def __enter__(self) -> StorageSCP:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- association events ----

    def _tag(self, assoc: Association) -> str:
        with self._lock:
            record = self._records.get(assoc)
        return str(record.id) if record else "?"

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
        try:
            with self.sessions.begin() as session:
                row = record_association(
                    session,
                    calling_ae=calling_ae,
                    called_ae=called_ae,
                    peer_host=requestor.address,
                    peer_port=requestor.port,
                    accepted=True,
                )
        except Exception:
            # Instances could not name their association: refuse the whole association instead.
            logger.exception(
                "association ?: cannot record %s from %s, aborting", calling_ae, requestor.address
            )
            assoc.abort()
            return
        with self._lock:
            self._records[assoc] = _AssociationRecord(row.id, calling_ae, called_ae, requestor.address)
        logger.info(
            "association %d: accepted %s -> %s from %s:%d",
            row.id,
            calling_ae,
            called_ae,
            requestor.address,
            requestor.port,
        )

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
        row_id = "?"
        try:
            with self.sessions.begin() as session:
                row = record_association(
                    session,
                    calling_ae=calling_ae,
                    called_ae=called_ae,
                    peer_host=requestor.address,
                    peer_port=requestor.port,
                    accepted=False,
                    reason=reason,
                )
                row_id = str(row.id)
        except Exception:
            logger.exception("association ?: cannot record the rejection of %s", requestor.address)
        logger.warning(
            "association %s: rejected from %s:%d: %s", row_id, requestor.address, requestor.port, reason
        )

    def _on_closed(self, event: evt.Event) -> None:
        how = {"EVT_RELEASED": "released", "EVT_ABORTED": "aborted"}.get(
            event.event.name, "connection closed"
        )
        self._finish(event.assoc, how)

    def _finish(self, assoc: Association, how: str) -> None:
        """Close the association's row once (released, aborted or connection lost, whichever is first)."""
        with self._lock:
            record = self._records.pop(assoc, None)
        if record is None:
            return
        try:
            with self.sessions.begin() as session:
                end_association(session, record.id, n_instances=record.n_instances)
        except Exception:
            logger.exception("association %d: cannot record its end", record.id)
        logger.info("association %d: %s after %d new instances", record.id, how, record.n_instances)

    def _on_echo(self, event: evt.Event) -> int:
        logger.debug("association %s: C-ECHO", self._tag(event.assoc))
        return SUCCESS

    def _on_event_report(self, event: evt.Event) -> tuple[int, Dataset | None]:
        logger.debug("association %s: N-EVENT-REPORT", self._tag(event.assoc))
        return commitment.on_event_report(self.settings, self.sessions, event)

    # ---- C-STORE ----

    def _on_store(self, event: evt.Event) -> Dataset:
        with self._lock:
            record = self._records.get(event.assoc)
        if record is None:
            return _status(OUT_OF_RESOURCES, "association not recorded")
        try:
            return self._store(event, record)
        except _Refused as refusal:
            logger.warning(
                "association %d: C-STORE failed with 0x%04X: %s", record.id, refusal.status, refusal.reason
            )
            return _status(refusal.status, refusal.reason)
        except Exception:
            logger.exception(
                "association %d: unexpected error storing %s",
                record.id,
                cast(C_STORE, event.request).AffectedSOPInstanceUID,
            )
            return _status(OUT_OF_RESOURCES, "internal error, see the node log")

    def _store(self, event: evt.Event, record: _AssociationRecord) -> Dataset:
        """Validate, write durably, record (with intake) in one transaction, then answer Success."""
        data = event.encoded_dataset()
        ds, fields = _validate(event, data)
        SOPInstanceUID = fields["sop_instance_uid"]
        with self.sessions() as session:
            existing = find_instance(session, SOPInstanceUID)
        if existing is not None:
            return self._answer_resend(record, existing, data)
        try:
            stored = self.store.write(data)
        except StorageError as e:
            logger.error("association %d: cannot store %s: %s", record.id, SOPInstanceUID, e)
            return _status(OUT_OF_RESOURCES, "cannot write the instance to storage")
        try:
            with self.sessions.begin() as session:
                instance = record_instance(
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
                    self.intake(session, instance, ds)
        except Exception:
            self._discard(record, stored.path)  # never acknowledged: the file must not stay
            with self.sessions() as session:
                existing = find_instance(session, SOPInstanceUID)
            if existing is not None:  # another association stored it meanwhile
                return self._answer_resend(record, existing, data)
            logger.exception("association %d: cannot record %s", record.id, SOPInstanceUID)
            return _status(OUT_OF_RESOURCES, "cannot record the instance")
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
        return _status(SUCCESS)

    def _answer_resend(self, record: _AssociationRecord, existing: Instance, data: bytes) -> Dataset:
        """A re-sent SOP Instance UID: identical bytes are a success, other bytes are refused.

        A UID names one object (PS3.3 C.12.1.1.1): the held original is never replaced
        (``node.duplicate_policy = "reject"``).
        """
        if classify_resend(existing, hashlib.sha256(data).hexdigest()) == "identical":
            logger.info(
                "association %d: %s re-sent with identical content, already stored",
                record.id,
                existing.sop_instance_uid,
            )
            return _status(SUCCESS)
        logger.warning(
            "association %d: %s re-sent with other content; the original is kept",
            record.id,
            existing.sop_instance_uid,
        )
        return _status(DUPLICATE_SOP_INSTANCE, "SOP Instance UID already stored with other content")

    def _discard(self, record: _AssociationRecord, path: str) -> None:
        try:
            self.store.absolute(path).unlink(missing_ok=True)
        except (OSError, StorageError):
            logger.exception("association %d: cannot remove unrecorded file %s", record.id, path)
