"""A DICOM client that sends what well-behaved ones refuse to: any command class on any context,
any bytes as a data set, and hand-made association request PDUs over a bare socket.
"""

from __future__ import annotations

import io
import socket
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import build_context

from tests.dicom_nodes import AE_TITLE, CALLING

Store = Callable[..., tuple[int, str]]


@contextmanager
def raw_store(
    port: int, context_class: str, transfer_syntax: str = ExplicitVRLittleEndian
) -> Iterator[Store]:
    """An association with one context; ``store(uid, body, command_class=context_class)`` sends a
    C-STORE request of ``command_class`` with ``body`` as its data set and returns (status, comment).
    """
    ae = AE(ae_title=CALLING)
    ae.add_requested_context(context_class, transfer_syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title=AE_TITLE)
    assert assoc.is_established
    context_id = int(assoc.accepted_contexts[0].context_id or 0)
    message_id = iter(range(1, 1000))

    def store(sop_instance_uid: str, body: bytes, command_class: str = context_class) -> tuple[int, str]:
        req = C_STORE()
        req.MessageID = next(message_id)
        req.AffectedSOPClassUID = command_class
        req.AffectedSOPInstanceUID = sop_instance_uid
        req.Priority = 2
        req.DataSet = io.BytesIO(body)
        # Pause the requestor's reactor as send_c_store does, so it cannot take our response.
        assoc._reactor_checkpoint.clear()
        while not assoc._is_paused:
            time.sleep(0.0001)
        try:
            assoc.dimse.send_msg(req, context_id)
            _, rsp = assoc.dimse.get_msg(block=True)
        finally:
            assoc._reactor_checkpoint.set()
        assert rsp is not None, "no C-STORE response"
        return int(rsp.Status), str(rsp.ErrorComment or "")

    try:
        yield store
    finally:
        assoc.release()


def association_request(
    calling_ae: bytes = CALLING.encode(),
    called_ae: bytes = AE_TITLE.encode(),
    abstract_syntax: str = "1.2.840.10008.1.1",
    transfer_syntax: str | None = None,
) -> bytes:
    """An A-ASSOCIATE-RQ PDU proposing one context (Verification, pynetdicom's default transfer
    syntaxes, unless told), with the AE title fields given byte for byte."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = "PLACEHOLDER"
    primitive.called_ae_title = "PLACEHOLDER"
    context = build_context(abstract_syntax, transfer_syntax)
    context.context_id = 1
    primitive.presentation_context_definition_list = [context]
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = 16382
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = "1.2.826.0.1.3680043.9.3811.1"
    primitive.user_information = [maximum, implementation]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    data = bytearray(pdu.encode())
    data[10:26] = called_ae.ljust(16)[:16]  # PS3.8 Table 9-11
    data[26:42] = calling_ae.ljust(16)[:16]
    return bytes(data)


def read_pdu(sock: socket.socket, timeout_s: float = 5) -> bytes:
    """One whole PDU from ``sock`` (b"" when the peer closed first)."""
    sock.settimeout(timeout_s)
    header = b""
    while len(header) < 6:
        chunk = sock.recv(6 - len(header))
        if not chunk:
            return b""
        header += chunk
    (length,) = struct.unpack(">L", header[2:6])
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        if not chunk:
            break
        body += chunk
    return header + body


def closed_by_peer(sock: socket.socket, timeout_s: float) -> bool:
    """Whether the other end closes ``sock`` within ``timeout_s`` (reads and drops what comes)."""
    sock.settimeout(timeout_s)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True
    return True
