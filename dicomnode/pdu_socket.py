"""Reading PDUs off an association's socket in one buffer instead of 4 KiB pieces.

pynetdicom's ``AssociationSocket.recv(n)`` reads a PDU in ``socket.recv(4096)`` calls, each extending
a ``bytearray``: for a 1 MiB P-DATA-TF PDU that is 256 Python loop turns and as many copies, about
1 ms of CPU per MiB received (a 2048² 16-bit image is 8 MiB). :class:`BulkReadSocket` reads straight
into one buffer of the PDU's size with ``recv_into``, returning what arrived before the connection
closed, as pynetdicom's does; socket errors and timeouts propagate unchanged.
"""

from __future__ import annotations

import socket
from typing import Any, cast

from pynetdicom import evt
from pynetdicom.transport import AssociationSocket


def recv_bytes(sock: socket.socket, nr_bytes: int) -> bytearray:
    """``nr_bytes`` read into one buffer with ``recv_into``; fewer when the peer closed first.

    Socket errors and timeouts propagate unchanged. Both of the SCP's paths read PDUs with it.
    """
    buffer = bytearray(nr_bytes)
    view = memoryview(buffer)
    received = 0
    while received < nr_bytes:
        count = sock.recv_into(view[received:], nr_bytes - received)
        if not count:  # connection closed: what has arrived
            break
        received += count
    view.release()
    if received < nr_bytes:
        del buffer[received:]
    return buffer


class BulkReadSocket(AssociationSocket):
    """An ``AssociationSocket`` whose ``recv`` fills one buffer of the requested size."""

    def recv(self, nr_bytes: int) -> bytearray:
        return recv_bytes(cast(socket.socket, self.socket), nr_bytes)  # short at EOF, like pynetdicom's


def read_pdus_in_bulk(event: evt.Event) -> None:
    """EVT_CONN_OPEN handler: the association's socket reads each PDU in one buffer."""
    sock: Any = event.assoc.dul.socket
    if type(sock) is AssociationSocket:
        sock.__class__ = BulkReadSocket
