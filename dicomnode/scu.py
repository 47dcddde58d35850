"""The Verification and Storage SCU: C-ECHO a peer, C-STORE instances to it over one association.

Failures that concern the whole peer (no association: refused, unreachable, aborted) raise
:class:`DeliveryError`, so callers retry the peer later; a failure of one instance is reported in its
:class:`SendResult` and the remaining instances are still sent.

Presentation contexts (PS3.8 9.3.2.2): for every SOP class among the items, one context per
compressed transfer syntax the items are encoded in, and one context proposing their uncompressed
syntaxes plus Explicit and Implicit VR Little Endian, which every Storage SCP supports (PS3.5 10.1).
An item the peer accepted only uncompressed is decoded and sent uncompressed (its SOP Instance UID
does not change: the transfer syntax is an encoding, not the object; Lossy Image Compression stays).

Message IDs (PS3.7 9.3.1.1): each C-STORE request of an association gets its own Message ID, 1, 2, 3…
in sending order, wrapping from 65535 back to 1 (the ID is an unsigned short; 0 is not used), so a
peer's log and its responses tell the requests apart.
"""

from __future__ import annotations

import copy
import logging
import socket
import ssl
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.status import code_to_category

from dicomnode.config import PeerSettings, SecuritySettings
from dicomnode.errors import ConfigError, DeliveryError

logger = logging.getLogger(__name__)

MAX_PRESENTATION_CONTEXTS = 128  # context IDs are the odd numbers 1..255 (PS3.8 9.3.2.2)
MAX_MESSAGE_ID = 0xFFFF  # Message ID (0000,0110) is US (PS3.7 E.1)
_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


@dataclass(frozen=True)
class SendResult:
    """What became of one item: the peer's C-STORE status, or why it was never answered.

    ``status`` is None when the item was not sent (unreadable file, no acceptable presentation
    context); ``error`` then says why. For failure statuses ``error`` holds the peer's Error Comment.
    """

    sop_instance_uid: str
    status: int | None
    error: str | None = None

    def __post_init__(self) -> None:
        if self.status is None and not self.error:
            raise ValueError(f"SendResult for {self.sop_instance_uid!r}: no status needs an error")
        if self.status is not None and not 0 <= self.status <= 0xFFFF:
            raise ValueError(f"SendResult for {self.sop_instance_uid!r}: status {self.status} is not 16-bit")

    @property
    def succeeded(self) -> bool:
        """Stored by the peer: Success, or a Warning such as Coercion of Data Elements (PS3.4 B.2.3)."""
        return self.status is not None and code_to_category(self.status) in ("Success", "Warning")


def set_tcp_nodelay(event: evt.Event) -> None:
    """EVT_CONN_OPEN handler: send each DIMSE message at once (pynetdicom leaves Nagle on)."""
    sock = getattr(event.assoc.dul.socket, "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def client_tls_context(security: SecuritySettings | None) -> ssl.SSLContext:
    """TLS for a peer with ``tls = true`` (PS3.15 B.1): verify it against ``tls_ca_certificates`` (else
    the system trust store) and present the node's own certificate when one is configured."""
    cafile = security.tls_ca_certificates if security else None
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if security is not None and security.tls_certificate and security.tls_private_key:
            context.load_cert_chain(security.tls_certificate, security.tls_private_key)
    except (ssl.SSLError, OSError) as e:
        raise ConfigError(f"security.tls_ca_certificates: cannot set up TLS ({cafile}): {e}") from e
    return context


def _associate(
    peer: PeerSettings,
    calling_ae: str,
    contexts: Sequence[tuple[str, list[str]]],
    timeout_s: float,
    security: SecuritySettings | None,
) -> Association:
    """An established association to ``peer``, or :class:`DeliveryError` saying why there is none."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout_s
    for abstract_syntax, transfer_syntaxes in contexts:
        ae.add_requested_context(abstract_syntax, transfer_syntaxes)
    tls_args = (client_tls_context(security), peer.host) if peer.tls else None
    where = f"{peer.ae_title}@{peer.host}:{peer.port}"
    connected: list[bool] = []
    assoc = ae.associate(
        peer.host,
        peer.port,
        ae_title=peer.ae_title,
        tls_args=tls_args,
        evt_handlers=[
            (evt.EVT_CONN_OPEN, set_tcp_nodelay),
            (evt.EVT_CONN_OPEN, lambda event: connected.append(True)),
        ],
    )
    if assoc.is_established:
        return assoc
    if not connected:
        raise DeliveryError(
            f"peer {peer.name} ({where}) unreachable: no connection within {timeout_s:g} s "
            "(refused, timed out or TLS handshake failed)"
        )
    if assoc.is_rejected:
        rj = cast(A_ASSOCIATE, assoc.acceptor.primitive)
        raise DeliveryError(
            f"peer {peer.name} ({where}) rejected the association: {rj.result_str}, {rj.reason_str}"
        )
    raise DeliveryError(f"peer {peer.name} ({where}) aborted the association or did not answer it")


def echo(
    peer: PeerSettings, calling_ae: str, timeout_s: float = 30, *, security: SecuritySettings | None = None
) -> int:
    """C-ECHO ``peer`` (PS3.7 9.1.5) and return its status; :class:`DeliveryError` without an answer."""
    assoc = _associate(peer, calling_ae, [(Verification, list(_UNCOMPRESSED))], timeout_s, security)
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    if "Status" not in status:
        raise DeliveryError(f"peer {peer.name} did not answer the C-ECHO within {timeout_s:g} s")
    logger.info("peer %s: C-ECHO status 0x%04X", peer.name, status.Status)
    return int(status.Status)


@dataclass(frozen=True)
class _Item:
    """One item to send, read: its dataset, or the result that says why it cannot be sent."""

    ds: Dataset | None
    SOPInstanceUID: str
    SOPClassUID: str = ""
    TransferSyntaxUID: str = ""
    failed: SendResult | None = None


def _read(item: Path | Dataset) -> _Item:
    if isinstance(item, Dataset):
        ds, where = item, "dataset"
    else:
        where = str(item)
        try:
            ds = dcmread(item)
        except Exception as e:  # any unreadable file is that item's failure only
            return _Item(
                None, "", failed=SendResult("", None, f"cannot read {where}: {type(e).__name__}: {e}")
            )
    uid = str(ds.get("SOPInstanceUID", ""))
    file_meta = getattr(ds, "file_meta", None)
    syntax = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    missing = [kw for kw in ("SOPClassUID", "SOPInstanceUID") if not ds.get(kw)] + (
        [] if syntax else ["TransferSyntaxUID"]
    )
    if missing:
        return _Item(None, uid, failed=SendResult(uid, None, f"{where} lacks {', '.join(missing)}"))
    return _Item(ds, uid, str(ds.SOPClassUID), str(syntax))


def _contexts(items: Sequence[_Item]) -> list[tuple[str, list[str]]]:
    by_class: dict[str, list[str]] = {}
    for item in items:
        syntaxes = by_class.setdefault(item.SOPClassUID, [])
        if item.TransferSyntaxUID not in syntaxes:
            syntaxes.append(item.TransferSyntaxUID)
    contexts = []
    for sop_class, syntaxes in by_class.items():
        contexts += [(sop_class, [ts]) for ts in syntaxes if UID(ts).is_compressed]
        plain = [ts for ts in syntaxes if not UID(ts).is_compressed]
        contexts.append((sop_class, list(dict.fromkeys([*plain, *_UNCOMPRESSED]))))
    return contexts


def _decompressed(ds: Dataset) -> Dataset:
    """A copy of ``ds`` in Explicit VR Little Endian, for a peer that accepted nothing else."""
    plain = copy.deepcopy(ds)
    plain.decompress(generate_instance_uid=False)  # same object, other encoding: same SOP Instance UID
    return plain


def message_ids(first: int = 1) -> Iterator[int]:
    """Message IDs for the requests of one association: ``first``, ``first`` + 1, … 65535, 1, 2, …"""
    if not 1 <= first <= MAX_MESSAGE_ID:
        raise ValueError(f"first Message ID {first!r} is not within 1..{MAX_MESSAGE_ID}")
    msg_id = first
    while True:
        yield msg_id
        msg_id = msg_id % MAX_MESSAGE_ID + 1


def _store(assoc: Association, item: _Item, msg_id: int) -> Dataset:
    assert item.ds is not None
    try:
        return assoc.send_c_store(item.ds, msg_id=msg_id)
    except ValueError:  # no accepted context for this transfer syntax
        if not UID(item.TransferSyntaxUID).is_compressed:
            raise
        return assoc.send_c_store(_decompressed(item.ds), msg_id=msg_id)


def send(
    peer: PeerSettings,
    calling_ae: str,
    items: Sequence[Path | Dataset],
    timeout_s: float = 60,
    *,
    security: SecuritySettings | None = None,
) -> list[SendResult]:
    """C-STORE every item to ``peer`` over ONE association; one result per item, in order.

    Raises :class:`DeliveryError` when there is no association, or the association is lost before
    every readable item was answered (the peer may hold some: resending is safe, a UID is a UID).
    """
    read = [_read(item) for item in items]
    sendable = [item for item in read if item.failed is None]
    if not sendable:
        return [item.failed for item in read if item.failed is not None]
    contexts = _contexts(sendable)
    if len(contexts) > MAX_PRESENTATION_CONTEXTS:
        raise DeliveryError(
            f"{len(contexts)} presentation contexts needed for {len(sendable)} instances, "
            f"more than {MAX_PRESENTATION_CONTEXTS}: send them in smaller groups"
        )
    assoc = _associate(peer, calling_ae, contexts, timeout_s, security)
    results: list[SendResult] = []
    next_message_id = message_ids()
    try:
        for item in read:
            if item.failed is not None:
                results.append(item.failed)
                continue
            if not assoc.is_established:
                raise DeliveryError(
                    f"peer {peer.name}: association lost after {len(results)} of {len(read)} instances"
                )
            try:
                status = _store(assoc, item, next(next_message_id))
            except Exception as e:  # encoding, decompression, no context: this item only
                results.append(SendResult(item.SOPInstanceUID, None, f"{type(e).__name__}: {e}"))
                logger.warning("peer %s: %s not sent: %s", peer.name, item.SOPInstanceUID, e)
                continue
            if "Status" not in status:
                raise DeliveryError(
                    f"peer {peer.name}: no C-STORE response for {item.SOPInstanceUID} within {timeout_s:g} s"
                    " (association aborted)"
                )
            results.append(_result(item.SOPInstanceUID, status))
    finally:
        if assoc.is_established:
            assoc.release()
    failed = sum(not r.succeeded for r in results)
    logger.info("peer %s: sent %d instances, %d failed", peer.name, len(results), failed)
    return results


def _result(SOPInstanceUID: str, status: Dataset) -> SendResult:
    code = int(status.Status)
    category = code_to_category(code)
    if category in ("Success", "Warning"):
        return SendResult(SOPInstanceUID, code)
    comment = status.get("ErrorComment")
    return SendResult(SOPInstanceUID, code, f"{category} 0x{code:04X}" + (f": {comment}" if comment else ""))
