"""The door before the association: a TCP connection becomes an association only once it has asked.

pynetdicom starts an association (a thread that counts against ``maximum_associations``) for every
accepted TCP connection and waits for the A-ASSOCIATE-RQ for the whole ACSE timeout, so a few bare
connections that send nothing lock real peers out. :class:`GatedAssociationServer` waits for the
complete A-ASSOCIATE-RQ PDU (PS3.8 9.3.2) in a thread of its own, for ``request_timeout_s`` at most,
without consuming it (MSG_PEEK); a connection that has not sent it by then is closed and was never
an association. With TLS the gate waits for the first bytes of the handshake instead.

A request whose AE title fields hold control characters, backslashes or non-ASCII bytes (PS3.5 Table
6.2-1) is rejected here, permanent, "calling (called) AE title not recognized": pynetdicom would log
the raw title in a traceback, a line a peer could forge.

The gate also caps concurrent associations per peer address: a peer over its cap gets an
A-ASSOCIATE-RJ "rejected-transient, service-provider (presentation), local-limit-exceeded" (PS3.8
Table 9-21, the answer pynetdicom gives when ``maximum_associations`` is reached), so one busy or
hostile host cannot take every slot. The same caps count associations on both of the SCP's paths: a
plain storage request that the direct path takes (:meth:`DirectAcceptor.takes
<dicomnode.direct_association.DirectAcceptor.takes>`) is served on the gate's own thread or handed to
a receiving process, and the total (``maximum_associations``) is checked here for both, answered
with the same A-ASSOCIATE-RJ.
"""

from __future__ import annotations

import copy
import logging
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from pynetdicom import AE, evt
from pynetdicom.transport import ThreadedAssociationServer

from dicomnode.log_escape import printable

if TYPE_CHECKING:
    from dicomnode.direct_association import DirectAcceptor

logger = logging.getLogger(__name__)

A_ASSOCIATE_RQ = 0x01
PEEK_MAX = 65536  # bytes of a request the gate waits for; larger requests pass once this much is in


def _a_associate_rj(result: int, source: int, reason: int) -> bytes:
    """An A-ASSOCIATE-RJ PDU (PS3.8 9.3.4, Table 9-21)."""
    return b"\x03\x00" + struct.pack(">L", 4) + bytes((0, result, source, reason))


# Rejected-transient, service-provider (presentation related), local-limit-exceeded.
REJECT_LOCAL_LIMIT = _a_associate_rj(2, 3, 2)
# Rejected-permanent, service-user, calling / called AE title not recognized.
REJECT_CALLING_AE = _a_associate_rj(1, 1, 3)
REJECT_CALLED_AE = _a_associate_rj(1, 1, 7)


@dataclass(frozen=True)
class RefusedRequest:
    """An association request the gate answered itself (the SCP records and logs it)."""

    peer_host: str
    peer_port: int
    calling_ae: str
    called_ae: str
    reason: str


def _ae_title(raw: bytes) -> str:
    return raw.decode("ascii", "replace").strip(" \x00")


def _ae_titles(pdu: bytes) -> tuple[str, str]:
    """Calling and Called AE Titles of an A-ASSOCIATE-RQ (PS3.8 Table 9-11: bytes 11-26, 27-42)."""
    if len(pdu) < 42:
        return "", ""
    return _ae_title(pdu[26:42]), _ae_title(pdu[10:26])


def _invalid_ae_title(raw: bytes) -> bool:
    """Whether an AE title field holds what PS3.5 Table 6.2-1 forbids: control characters, backslash, non-ASCII."""
    return any(byte < 0x20 or byte == 0x5C or byte > 0x7E for byte in raw)


class _ContextList(list):  # type: ignore[type-arg]
    """The server's supported presentation contexts, copied cheaply for each association.

    pynetdicom deep-copies them for every association it accepts: ~170 storage contexts with 13
    transfer syntaxes each took ~45 ms, most of the node's association set-up time. Each context is
    copied with fresh lists instead; the UIDs in them are immutable strings and can be shared.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> list[Any]:
        copies = []
        for context in self:
            twin = copy.copy(context)
            for name, value in vars(context).items():
                if isinstance(value, list | dict | set):
                    setattr(twin, name, copy.copy(value))
            copies.append(twin)
        return copies


class GatedAssociationServer(ThreadedAssociationServer):
    """A pynetdicom association server that admits a connection only once it has requested."""

    # A direct-path association runs on its request thread: closing the server must not wait for it
    # (the SCP gives running associations their time, then aborts them, itself).
    block_on_close = False

    def __init__(
        self,
        *args: Any,
        request_timeout_s: float = 5.0,
        max_associations_per_peer: int = 0,
        on_refused: Callable[[RefusedRequest], None] | None = None,
        direct: DirectAcceptor | None = None,
        **kwargs: Any,
    ) -> None:
        self.direct = direct
        self.request_timeout_s = request_timeout_s
        self.max_associations_per_peer = max_associations_per_peer  # 0: no cap
        self.on_refused = on_refused
        self._admit = threading.Lock()
        self._pending: set[socket.socket] = set()
        self._closing = False
        super().__init__(*args, **kwargs)
        self.contexts = _ContextList(self.contexts)

    # socketserver runs this in a new thread per accepted connection (ThreadingMixIn).
    def process_request_thread(self, request: Any, client_address: Any) -> None:
        host, port = str(client_address[0]), int(client_address[1])
        try:
            with self._admit:
                self._pending.add(request)
            try:
                pdu = self._wait_for_request(request)
            finally:
                with self._admit:
                    self._pending.discard(request)
            if pdu is None:
                logger.info(
                    "connection from %s:%d closed, or sent no association request within %g s; closed",
                    host,
                    port,
                    self.request_timeout_s,
                )
                self.shutdown_request(request)
                return
            refusal = self._bad_ae_title(pdu)
            plain = self.direct.takes(pdu) if self.direct is not None and pdu else None
            admitted: Callable[[], None] | None = None
            if refusal is None:
                with self._admit:
                    if self._closing:
                        self.shutdown_request(request)
                        return
                    if self._over_peer_cap(host):
                        refusal = (REJECT_LOCAL_LIMIT, self._cap_reason(host))
                    elif self._running() >= self.ae.maximum_associations:
                        refusal = (REJECT_LOCAL_LIMIT, f"more than {self.ae.maximum_associations} associations at once")
                    elif plain is not None and self.direct is not None:
                        admitted = self.direct.admit(request, plain, len(pdu), (host, port))
                    else:
                        self.finish_request(request, client_address)  # starts the Association thread
            if admitted is not None:
                admitted()  # on this thread until the association ends, or handed to a receiving process
                return
            if refusal is not None:
                self._reject(request, pdu, host, port, *refusal)
        except Exception:
            self.handle_error(request, client_address)
            self.shutdown_request(request)

    def _wait_for_request(self, sock: Any) -> bytes | None:
        """The peeked A-ASSOCIATE-RQ (or first bytes, with TLS) once whole; None at timeout or EOF."""
        deadline = time.monotonic() + self.request_timeout_s
        tls = isinstance(sock, ssl.SSLSocket)
        need = 6
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._closing:
                return None
            poller = select.poll()  # not select.select: no limit on the descriptor's number
            poller.register(sock.fileno(), select.POLLIN)
            if not poller.poll(remaining * 1000):
                return None
            if tls:
                return b""  # the TLS handshake has begun; its bytes are not ours to read
            peeked = sock.recv(PEEK_MAX, socket.MSG_PEEK)
            if not peeked:
                return None  # the peer closed the connection
            if len(peeked) >= 6:
                (length,) = struct.unpack_from(">L", peeked, 2)
                need = min(6 + length, PEEK_MAX)
            if len(peeked) >= need:
                return peeked
            time.sleep(0.002)  # part of the PDU is in; select would return at once

    @staticmethod
    def _bad_ae_title(pdu: bytes) -> tuple[bytes, str] | None:
        """A rejection for AE title fields pynetdicom cannot decode (it would log them raw), or None."""
        if len(pdu) < 42 or pdu[0] != A_ASSOCIATE_RQ:
            return None
        calling, called = pdu[26:42], pdu[10:26]
        if _invalid_ae_title(calling):
            return REJECT_CALLING_AE, f"calling AE title '{printable(_ae_title(calling))}' is not a valid AE title"
        if _invalid_ae_title(called):
            return REJECT_CALLED_AE, f"called AE title '{printable(_ae_title(called))}' is not a valid AE title"
        return None

    def _cap_reason(self, host: str) -> str:
        return f"more than {self.max_associations_per_peer} associations at once from {host}"

    def _running(self, host: str | None = None) -> int:
        """Associations running on either path (of ``host``, or all)."""
        general = sum(
            1
            for a in self.active_associations
            if a.is_alive() and a.is_acceptor and (host is None or a.requestor.address == host)
        )
        return general + (self.direct.count(host) if self.direct is not None else 0)

    def _over_peer_cap(self, host: str) -> bool:
        cap = self.max_associations_per_peer
        return bool(cap) and self._running(host) >= cap

    def _reject(self, sock: Any, pdu: bytes, host: str, port: int, rejection: bytes, reason: str) -> None:
        """Answer ``rejection`` (an A-ASSOCIATE-RJ) and close, reading the request first."""
        calling, called = _ae_titles(pdu)
        try:
            if pdu:
                sock.recv(len(pdu))  # consume the request, so closing does not reset the connection
            sock.sendall(rejection)
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(1.0)
            while sock.recv(4096):  # the requestor closes the transport on A-ASSOCIATE-RJ (Sta13)
                pass
        except OSError:
            pass
        finally:
            self.shutdown_request(sock)
        if self.on_refused is not None:
            self.on_refused(RefusedRequest(host, port, printable(calling, 16), printable(called, 16), reason))
        else:
            logger.warning("rejected %s from %s:%d: %s", printable(calling), host, port, reason)

    def shutdown(self) -> None:
        """Stop accepting, close connections still waiting at the gate, then shut down as pynetdicom does."""
        with self._admit:
            self._closing = True
            pending = list(self._pending)
        for sock in pending:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        super().shutdown()


def _unbind_standard_log_handlers(event: evt.Event) -> None:
    """EVT_CONN_OPEN: drop pynetdicom's own per-PDU and per-message log handlers from the association.

    pynetdicom binds them to every association; they run on each PDU received or sent and describe
    each A-ASSOCIATE-RQ context by context, mostly for DEBUG lines, plus an INFO line per C-STORE that
    repeats the node's own. Left out unless pynetdicom logs at DEBUG (``dicomnode -vv serve``).
    """
    assoc = event.assoc
    for kind in (evt.EVT_PDU_RECV, evt.EVT_PDU_SENT, evt.EVT_DIMSE_RECV, evt.EVT_DIMSE_SENT):
        bound = cast(list[tuple[Callable[..., Any], Any]], assoc.get_handlers(kind))
        for handler, _ in list(bound):
            if getattr(handler, "__module__", "") == "pynetdicom._handlers":
                assoc.unbind(kind, handler)


def start_gated_server(
    ae: AE,
    address: tuple[str, int],
    *,
    ssl_context: Any,
    evt_handlers: list[Any],
    request_timeout_s: float,
    max_associations_per_peer: int,
    on_refused: Callable[[RefusedRequest], None] | None = None,
    direct: DirectAcceptor | None = None,
) -> GatedAssociationServer:
    """Listen on ``address`` in a background thread, as ``ae.start_server(..., block=False)`` does."""
    server = ae.make_server(
        address,
        ssl_context=ssl_context,
        evt_handlers=evt_handlers,
        server_class=GatedAssociationServer,
        request_timeout_s=request_timeout_s,
        max_associations_per_peer=max_associations_per_peer,
        on_refused=on_refused,
        direct=direct,
    )
    assert isinstance(server, GatedAssociationServer)
    if not logging.getLogger("pynetdicom").isEnabledFor(logging.DEBUG):
        server.bind(evt.EVT_CONN_OPEN, _unbind_standard_log_handlers)
    thread = threading.Thread(target=server.serve_forever, name=f"GatedAssociationServer@{address[1]}", daemon=True)
    thread.start()
    ae._servers.append(server)  # as start_server does: AE.shutdown() and server.shutdown() expect it
    return server
