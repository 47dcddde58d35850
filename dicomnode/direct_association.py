"""Plain storage associations served directly on their sockets: the SCP's fast path.

pynetdicom runs two threads per association that hand each PDU and each message over through queues
polled every millisecond, and copies a received data set four times on its way from the socket
(issue #10 measured ~2 ms of waiting and 1.3-1.8 ms of CPU per 512² image there). Most associations a
node receives are plain: a modality or PACS proposes storage (and verification) contexts with the
usual user information and sends C-STOREs. :class:`DirectAcceptor` serves those on the gate's own
thread: each PDU is read with ``recv_into`` into one buffer, a data set of one fragment is handed to
the SCP's C-STORE path without a copy, and the response leaves as soon as it is known.

Everything else (TLS, SCP/SCU role selection, the storage commitment context, user identity or
extended negotiation, a request that does not parse) goes to pynetdicom as before
(:mod:`dicomnode.association_gate` decides). Both paths share the SCP's policy and handlers: AE
title checks and their A-ASSOCIATE-RJ (PS3.8 Table 9-21, the same result, source and reason as
pynetdicom's), the association rows and log lines, and every C-STORE check and status.

A PDU that breaks PS3.8 (unknown type, a PDV for a context that was not accepted, a command set that
does not decode or exceeds 64 KiB, a PDU longer than the maximum the node announced) ends the
association with an A-ABORT; nothing a peer sends raises past the association.
``node.acse_timeout_s`` bounds the wait for the A-ASSOCIATE-RQ's bytes, ``node.network_timeout_s``
the wait for a PDU between messages (an idle association is then closed), ``node.dimse_timeout_s``
the wait for the next PDU of a message under way.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from dicomnode import pdu
from dicomnode.log_escape import printable
from dicomnode.pdu_socket import recv_bytes

if TYPE_CHECKING:
    from dicomnode.receivers import ReceiverPool
    from dicomnode.scp import StorageSCP

logger = logging.getLogger(__name__)

C_STORE_RQ, C_ECHO_RQ = 0x0001, 0x0030
UNRECOGNIZED_OPERATION = 0x0211  # PS3.7 C.4.5
IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
PDU_SLACK = 64 * 1024  # how far a PDU may exceed the announced maximum (others' rounding) before abort
COMMAND_MAX = 64 * 1024  # a command set is a few hundred bytes (PS3.7 E.1); more is not one


class _Closed(Exception):
    """The peer closed the connection, or it timed out."""


class _TimedOut(_Closed):
    """No PDU within the timeout: the node aborts the association."""


def _read_exact(sock: socket.socket, n: int) -> bytearray:
    """Exactly ``n`` bytes from ``sock``, else :class:`_Closed` (:class:`_TimedOut` at its timeout)."""
    try:
        data = recv_bytes(sock, n)
    except TimeoutError as e:
        raise _TimedOut(f"nothing received for {sock.gettimeout()} s") from e
    except OSError as e:
        raise _Closed(str(e) or type(e).__name__) from e
    if len(data) < n:
        raise _Closed("connection closed by the peer")
    return data


class DirectAssociation:
    """One accepted plain association: negotiation done, serving messages until release or abort."""

    def __init__(
        self, acceptor: DirectAcceptor, sock: socket.socket, request: pdu.AssociateRequest, peer: tuple[str, int]
    ) -> None:
        self.acceptor = acceptor
        self.scp = acceptor.scp
        self.sock = sock
        self.request = request
        self.peer_host, self.peer_port = peer
        self.contexts: dict[int, tuple[str, str]] = {}  # accepted: id -> (abstract syntax, transfer syntax)
        self.peer_max_pdu = request.max_pdu
        self.aborting = False
        self.thread = threading.current_thread()

    # ---- socket I/O ----

    def _recv_exact(self, n: int) -> bytearray:
        return _read_exact(self.sock, n)

    def _send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as e:
            raise _Closed(str(e)) from e

    def _read_pdu(self) -> tuple[int, bytearray]:
        header = self._recv_exact(6)
        kind = header[0]
        (length,) = struct.unpack_from(">L", header, 2)
        maximum = self.scp.settings.node.maximum_pdu_bytes
        if length > maximum + PDU_SLACK:
            raise pdu.PduError(f"PDU of {length} bytes exceeds the maximum of {maximum}")
        return kind, self._recv_exact(length)

    def _abort(self, reason: int) -> None:
        try:
            self.sock.sendall(pdu.abort(2, reason))
        except OSError:
            pass

    # ---- the association ----

    def negotiate(self) -> bool:
        """Answer the request: A-ASSOCIATE-AC (True) or -RJ (False), recording either."""
        request, scp = self.request, self.scp
        rejection = scp.direct_rejection(request)
        if rejection is not None:
            (result, source, reason), text = rejection
            self._send_closing(pdu.associate_rj(result, source, reason))
            scp.record_rejection(self.peer_host, self.peer_port, request.calling_ae, request.called_ae, text)
            return False
        results = []
        for context in request.contexts:
            supported = self.acceptor.supported.get(context.abstract_syntax)
            # A rejected context still carries one transfer syntax sub-item, not significant (PS3.8 9.3.3.2)
            proposed = context.transfer_syntaxes[0] if context.transfer_syntaxes else IMPLICIT_VR_LITTLE_ENDIAN
            if supported is None:
                results.append((context.id, pdu.ABSTRACT_SYNTAX_NOT_SUPPORTED, proposed))
                continue
            chosen = next((ts for ts in context.transfer_syntaxes if ts in supported), None)
            if chosen is None:
                results.append((context.id, pdu.TRANSFER_SYNTAXES_NOT_SUPPORTED, proposed))
                continue
            results.append((context.id, pdu.ACCEPTANCE, chosen))
            self.contexts[context.id] = (context.abstract_syntax, chosen)
        if not scp.open_record(self, request.calling_ae, request.called_ae, self.peer_host, self.peer_port):
            self._abort(0)
            return False
        node = scp.settings.node
        self._send(
            pdu.associate_ac(
                request, results, node.maximum_pdu_bytes, self.acceptor.implementation_class_uid,
                self.acceptor.implementation_version,
            )
        )
        return True

    def _send_closing(self, data: bytes) -> None:
        """Send ``data`` (a rejection), then wait briefly for the requestor to close the transport."""
        try:
            self.sock.sendall(data)
            self.sock.shutdown(socket.SHUT_WR)
            self.sock.settimeout(1.0)
            while self.sock.recv(4096):
                pass
        except OSError:
            pass

    def serve(self) -> str:
        """Messages until the association ends; how it ended ("released", "aborted", ...)."""
        command: bytearray | None = bytearray()
        fragments: list[memoryview] = []
        pending: dict[int, bytes] | None = None  # a command whose data set is arriving
        pending_context = 0
        node = self.scp.settings.node
        while True:
            # Idle between messages: the network timeout; inside one: the DIMSE timeout.
            within = pending is not None or bool(command)
            self.sock.settimeout(node.dimse_timeout_s if within else node.network_timeout_s)
            try:
                kind, body = self._read_pdu()
            except _TimedOut as e:
                logger.warning("association %s: %s, aborting", self.scp.tag(self), e)
                self._abort(0)
                return "aborted"
            except _Closed:
                return "aborted" if self.aborting else "connection closed"
            if kind == pdu.A_RELEASE_RQ:
                try:
                    self._send(pdu.RELEASE_RP)
                except _Closed:
                    pass
                return "released"
            if kind == pdu.A_ABORT:
                return "aborted"
            if kind != pdu.P_DATA_TF:
                known = pdu.A_ASSOCIATE_RQ <= kind <= pdu.A_ABORT
                raise pdu.PduError(
                    f"{'unexpected' if known else 'unrecognized'} PDU type 0x{kind:02X}",
                    pdu.UNEXPECTED_PDU if known else pdu.UNRECOGNIZED_PDU,
                )
            view = memoryview(body)
            i, n = 0, len(body)
            while i < n:
                if i + 6 > n:
                    raise pdu.PduError("PDV item header cut short")
                (length,) = struct.unpack_from(">L", body, i)
                if length < 2 or i + 4 + length > n:
                    raise pdu.PduError("PDV item length outside its PDU")
                context_id, flags = body[i + 4], body[i + 5]
                fragment = view[i + 6 : i + 4 + length]
                i += 4 + length
                if context_id not in self.contexts:
                    raise pdu.PduError(f"PDV on presentation context {context_id}, which was not accepted")
                if flags & 0x01:  # a command fragment
                    if pending is not None or command is None:
                        raise pdu.PduError("command fragment while a data set was expected", pdu.UNEXPECTED_PDU)
                    command += fragment
                    if len(command) > COMMAND_MAX:
                        raise pdu.PduError(f"command set longer than {COMMAND_MAX} bytes")
                    if flags & 0x02:
                        parsed = pdu.parse_command(command)
                        command = bytearray()
                        if pdu.command_us(parsed, pdu.DATA_SET_TYPE) == pdu.NO_DATA_SET:
                            self._dispatch(context_id, parsed, None)
                        else:
                            pending, pending_context, command = parsed, context_id, None
                else:  # a data set fragment
                    if pending is None or context_id != pending_context:
                        raise pdu.PduError("data set fragment without its command", pdu.UNEXPECTED_PDU)
                    fragments.append(fragment)
                    if flags & 0x02:
                        data = fragments[0] if len(fragments) == 1 else b"".join(fragments)
                        message, pending, command, fragments = pending, None, bytearray(), []
                        self._dispatch(context_id, message, data)

    def _dispatch(self, context_id: int, command: dict[int, bytes], data: bytes | memoryview | None) -> None:
        field = pdu.command_us(command, pdu.COMMAND_FIELD)
        message_id = pdu.command_us(command, pdu.MESSAGE_ID)
        if field is None or message_id is None or field & 0x8000:
            raise pdu.PduError("a command set without a request Command Field or Message ID")
        abstract, syntax = self.contexts[context_id]
        sop_class = pdu.command_ui(command, pdu.AFFECTED_SOP_CLASS)
        response: dict[int, int | str] = {
            pdu.COMMAND_FIELD: field | 0x8000,
            0x0120: message_id,
            pdu.DATA_SET_TYPE: pdu.NO_DATA_SET,
        }
        if field == C_STORE_RQ:
            sop_instance = pdu.command_ui(command, pdu.AFFECTED_SOP_INSTANCE)
            response[pdu.AFFECTED_SOP_CLASS] = sop_class
            response[pdu.AFFECTED_SOP_INSTANCE] = sop_instance
            status, comment = self.scp.store_request(self, abstract, syntax, sop_class, sop_instance, data)
            response[0x0900] = status
            if comment:
                response[0x0902] = comment
        elif field == C_ECHO_RQ:
            response[pdu.AFFECTED_SOP_CLASS] = sop_class or abstract
            response[0x0900] = self.scp.echo_status(self)
        else:
            logger.warning(
                "association %s: command 0x%04X on %s not supported", self.scp.tag(self), field, printable(abstract, 64)
            )
            if sop_class:
                response[pdu.AFFECTED_SOP_CLASS] = sop_class
            response[0x0900] = UNRECOGNIZED_OPERATION
        for piece in pdu.p_data(context_id, pdu.encode_command(response), True, self.peer_max_pdu):
            self._send(piece)

    def run(self) -> None:
        """Negotiate and serve; whatever happens, record the end and close the socket."""
        accepted = False
        how = "aborted"
        try:
            self.sock.settimeout(self.scp.settings.node.network_timeout_s)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # each response leaves at once
            accepted = self.negotiate()
            if accepted:
                how = self.serve()
        except pdu.PduError as e:
            logger.warning("association %s: protocol error, aborting: %s", self.scp.tag(self), printable(str(e), 200))
            self._abort(e.reason)
        except _Closed as e:
            how = "connection closed" if not self.aborting else "aborted"
            logger.debug("association %s: %s", self.scp.tag(self), e)
        except Exception:
            logger.exception("association %s: unexpected error, aborting", self.scp.tag(self))
            self._abort(0)
        finally:
            if accepted or self.scp.has_record(self):
                self.scp.close_record(self, how)
            try:
                self.sock.close()
            except OSError:
                pass

    def abort(self) -> None:
        """Abort from another thread (shutdown): A-ABORT, then the socket is shut so reads end."""
        self.aborting = True
        self._abort(0)
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class DirectAcceptor:
    """The SCP's direct path: which requests it takes, and the associations it is serving."""

    def __init__(self, scp: StorageSCP, supported: dict[str, tuple[str, ...]], implementation: tuple[str, str]):
        self.scp = scp
        self.supported = supported
        self.implementation_class_uid, self.implementation_version = implementation
        self._lock = threading.Lock()
        self._running: set[DirectAssociation] = set()
        self.pool: ReceiverPool | None = None  # set when receiving processes serve the direct path

    def takes(self, raw: bytes) -> pdu.AssociateRequest | None:
        """The parsed request when the direct path can serve it: plain, storage and verification only."""
        if len(raw) < 6 or raw[0] != pdu.A_ASSOCIATE_RQ:
            return None
        (length,) = struct.unpack_from(">L", raw, 2)
        if len(raw) != 6 + length:
            return None
        try:
            request = pdu.parse_associate_rq(memoryview(raw)[6:])
        except pdu.PduError:
            return None  # pynetdicom answers what does not parse, as it always has
        if not request.plain or any(c.abstract_syntax in self.scp.general_only for c in request.contexts):
            return None
        return request

    def count(self, host: str | None = None) -> int:
        """Associations running on the direct path, here and in the receiving processes."""
        with self._lock:
            here = sum(1 for a in self._running if host is None or a.peer_host == host)
        return here + (self.pool.count_running(host) if self.pool is not None else 0)

    def admit(
        self, sock: socket.socket, request: pdu.AssociateRequest, length: int, peer: tuple[str, int]
    ) -> Callable[[], None]:
        """Count a new association as running (the gate calls this under its admission lock); the
        returned call serves it: on the calling thread, or in a receiving process."""
        admitted = self.pool.admit(peer[0]) if self.pool is not None else None
        if admitted is not None and self.pool is not None:  # else none is alive: served here meanwhile
            receiver, token = admitted
            pool = self.pool
            return lambda: pool.dispatch(receiver, token, sock, length, peer)
        association = self._register(sock, request, peer)
        return lambda: self.serve(association, length)

    def _register(self, sock: socket.socket, request: pdu.AssociateRequest, peer: tuple[str, int]) -> DirectAssociation:
        association = DirectAssociation(self, sock, request, peer)
        with self._lock:
            self._running.add(association)
        return association

    def serve(self, association: DirectAssociation, length: int) -> None:
        """Serve an admitted association on this thread; its request (``length`` bytes) is still unread."""
        association.thread = threading.current_thread()
        try:
            association.sock.settimeout(self.scp.settings.node.acse_timeout_s)
            association._recv_exact(length)  # the request the gate peeked at
            association.run()
        except _Closed:
            association.sock.close()
        finally:
            with self._lock:
                self._running.discard(association)

    def serve_socket(self, sock: socket.socket, length: int, peer: tuple[str, int]) -> None:
        """Serve a connection handed over by the serving process (its request still unread)."""
        try:
            sock.settimeout(self.scp.settings.node.acse_timeout_s)
            request = pdu.parse_associate_rq(memoryview(_read_exact(sock, length))[6:])
        except (_Closed, pdu.PduError) as e:
            logger.warning("connection from %s:%d: cannot read its association request: %s", *peer, e)
            sock.close()
            return
        association = self._register(sock, request, peer)
        try:
            association.run()
        finally:
            with self._lock:
                self._running.discard(association)

    def stop(self, deadline: float) -> None:
        """Let running associations finish until ``deadline`` (monotonic), then abort the rest."""
        with self._lock:
            running = list(self._running)
        for association in running:
            association.thread.join(max(0.0, deadline - time.monotonic()))
            if association.thread.is_alive():
                logger.warning("association %s: still running at shutdown, aborting", self.scp.tag(association))
                association.abort()
                association.thread.join(5.0)
