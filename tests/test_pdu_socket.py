"""BulkReadSocket: a PDU read into one buffer, byte for byte what was sent, over a real socket pair."""

from __future__ import annotations

import os
import socket
import threading

from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.transport import AssociationSocket

from dicomnode.pdu_socket import BulkReadSocket


def _socket(sock: socket.socket) -> BulkReadSocket:
    bulk = AssociationSocket(Association(AE(), "acceptor"), client_socket=sock)
    bulk.__class__ = BulkReadSocket
    return bulk


def test_a_large_pdu_arrives_whole_across_many_segments() -> None:
    ours, theirs = socket.socketpair()
    payload = os.urandom(3 * 1024 * 1024 + 17)
    sender = threading.Thread(target=theirs.sendall, args=(payload,))
    sender.start()
    try:
        received = _socket(ours).recv(len(payload))
    finally:
        sender.join(10)
        ours.close()
        theirs.close()
    assert bytes(received) == payload and isinstance(received, bytearray)


def test_a_closed_connection_returns_what_arrived_as_pynetdicom_does() -> None:
    ours, theirs = socket.socketpair()
    theirs.sendall(b"0123456789")
    theirs.close()
    try:
        assert bytes(_socket(ours).recv(100)) == b"0123456789"
    finally:
        ours.close()
