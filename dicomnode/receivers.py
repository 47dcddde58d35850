"""Receiving processes: plain storage associations served on every core (``node.receive_processes``).

One Python process serves its associations one at a time under the interpreter lock, so four
concurrent senders were no faster than one (issue #10). With ``receive_processes = N`` the serving
process still accepts every connection, applies the association gate (request timeout, per-peer and
total caps, AE title syntax) and keeps the general path (TLS, storage commitment, anything
pynetdicom serves); a plain storage association's socket is handed to one of N receiving processes
(``SCM_RIGHTS`` over a Unix socket pair), the one serving the fewest. That process negotiates and
serves it exactly as the direct path in the serving process would (:mod:`dicomnode.direct_association`,
its own database engine, store and group committer: file, folder entry and row durable before each
Success) and reports back when it ends, so the caps stay exact across processes. It also reports each
association result and C-STORE status for the console's metrics.

A receiving process that dies (``kill -9``, out of memory) loses only its open associations (their
senders see the connection drop and re-send: nothing unacknowledged was promised); the serving
process releases their slots and starts another. Receiving processes exit with the node (they watch
its process id) and ignore the signals the node handles itself.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from dicomnode.config import Settings
from dicomnode.log_config import quiet_libraries
from dicomnode.log_escape import SingleLineMessages

logger = logging.getLogger(__name__)

MESSAGE_MAX = 4096
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _send(channel: socket.socket, lock: threading.Lock, message: dict[str, Any], fds: list[int] | None = None) -> None:
    data = json.dumps(message).encode()
    with lock:
        if fds:
            socket.send_fds(channel, [data], fds)
        else:
            channel.send(data)


class _Receiver:
    """The serving process's end of one receiving process."""

    def __init__(self, index: int, process: Any, channel: socket.socket) -> None:
        self.index = index
        self.process = process
        self.channel = channel
        self.lock = threading.Lock()
        self.running: dict[int, str] = {}  # association token -> peer host
        self.reader: threading.Thread | None = None
        self.stopped = threading.Event()


class ReceiverPool:
    """Starts, feeds and supervises the receiving processes of the serving process."""

    def __init__(self, settings: Settings, count: int, notify: Callable[..., None]) -> None:
        self.settings = settings
        self.count = count
        self.notify = notify  # StorageSCP._notify: metrics observers
        self.ctx = mp.get_context("spawn")
        self._lock = threading.Lock()
        self._receivers: list[_Receiver] = []
        self._tokens = 0
        self._stopping = False

    def start(self) -> None:
        for index in range(self.count):
            self._receivers.append(self._spawn(index))

    def _spawn(self, index: int) -> _Receiver:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        level = logging.getLogger().getEffectiveLevel()
        process = self.ctx.Process(
            target=receiver_main,
            args=(self.settings, theirs, index, level, os.getpid()),
            name=f"receiver-{index}",
            daemon=True,
        )
        process.start()
        theirs.close()
        receiver = _Receiver(index, process, ours)
        receiver.reader = threading.Thread(target=self._read, args=(receiver,), name=f"receiver-{index}", daemon=True)
        receiver.reader.start()
        logger.info("started receiving process %d (pid %s)", index, process.pid)
        return receiver

    def count_running(self, host: str | None = None) -> int:
        with self._lock:
            return sum(
                1 for r in self._receivers for peer in r.running.values() if host is None or peer == host
            )

    def admit(self, host: str) -> tuple[_Receiver, int] | None:
        """Count a new association against the least busy live receiver (call under the gate's lock);
        None while none is alive (one that died is being replaced)."""
        with self._lock:
            alive = [r for r in self._receivers if not r.stopped.is_set()]
            if not alive:
                return None
            receiver = min(alive, key=lambda r: len(r.running))
            self._tokens += 1
            receiver.running[self._tokens] = host
            return receiver, self._tokens

    def dispatch(
        self, receiver: _Receiver, token: int, sock: socket.socket, length: int, peer: tuple[str, int]
    ) -> None:
        """Hand ``sock`` (its A-ASSOCIATE-RQ of ``length`` bytes still unread) to ``receiver``."""
        try:
            _send(
                receiver.channel,
                receiver.lock,
                {"op": "serve", "token": token, "length": length, "host": peer[0], "port": peer[1]},
                [sock.fileno()],
            )
        except OSError as e:
            logger.error("receiving process %d cannot take a connection from %s: %s", receiver.index, peer[0], e)
            self._release(receiver, token)
        finally:
            sock.close()  # the receiving process holds its own descriptor now

    def _release(self, receiver: _Receiver, token: int) -> None:
        with self._lock:
            receiver.running.pop(token, None)

    def _read(self, receiver: _Receiver) -> None:
        """Reports from one receiving process, until it exits."""
        while True:
            try:
                data = receiver.channel.recv(MESSAGE_MAX)
            except OSError:
                data = b""
            if not data:
                break
            try:
                message = json.loads(data)
            except ValueError:
                logger.error("receiving process %d sent an unreadable report", receiver.index)
                continue
            op = message.get("op")
            if op == "end":
                self._release(receiver, int(message["token"]))
            elif op == "association":
                self.notify("association", bool(message["accepted"]))
            elif op == "c_store":
                self.notify("c_store", int(message["status"]), int(message["bytes"]))
            elif op == "stopped":
                receiver.stopped.set()
        receiver.stopped.set()
        receiver.channel.close()
        with self._lock:
            lost = len(receiver.running)
            receiver.running.clear()
            stopping = self._stopping
        if not stopping:
            receiver.process.join(5)
            logger.error(
                "receiving process %d exited (code %s), %d association(s) lost; starting another",
                receiver.index,
                receiver.process.exitcode,
                lost,
            )
            replacement = self._spawn(receiver.index)
            with self._lock:
                self._receivers = [replacement if r is receiver else r for r in self._receivers]

    def stop(self, deadline: float) -> None:
        """Let the receivers finish their associations until ``deadline`` (monotonic), then end them."""
        with self._lock:
            self._stopping = True
            receivers = list(self._receivers)
        for receiver in receivers:
            try:
                _send(receiver.channel, receiver.lock, {"op": "stop", "seconds": max(0.0, deadline - time.monotonic())})
            except OSError:
                pass
        for receiver in receivers:
            receiver.stopped.wait(max(0.0, deadline - time.monotonic()) + 10)
            receiver.process.join(5)
            if receiver.process.is_alive():
                logger.warning("receiving process %d did not stop; killing it", receiver.index)
                receiver.process.kill()
                receiver.process.join(5)
            if receiver.reader is not None:
                receiver.reader.join(5)  # it closes the channel


# ---- The receiving process ------------------------------------------------------------------------------


class _Reporter:
    """A receiving process's observer: association results and C-STORE statuses to the serving process."""

    def __init__(self, channel: socket.socket, lock: threading.Lock) -> None:
        self.channel, self.lock = channel, lock

    def association(self, accepted: bool) -> None:
        _send(self.channel, self.lock, {"op": "association", "accepted": accepted})

    def c_store(self, status: int, data_set_bytes: int) -> None:
        _send(self.channel, self.lock, {"op": "c_store", "status": status, "bytes": data_set_bytes})


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    logger.error("serving process %d is gone; receiving process exits", parent_pid)
    logging.shutdown()
    os._exit(75)


def receiver_main(settings: Settings, channel: socket.socket, index: int, log_level: int, parent_pid: int) -> None:
    """Entry point of a receiving process (multiprocessing 'spawn')."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s [%(processName)s]: %(message)s")
    quiet_libraries(show=log_level <= logging.DEBUG)
    for handler in logging.getLogger().handlers:
        handler.addFilter(SingleLineMessages())
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()

    from dicomnode.intake import Intake
    from dicomnode.scp import StorageSCP
    from storage.db import make_engine, session_factory
    from storage.store import InstanceStore

    node = settings.node
    sessions = session_factory(make_engine(node.effective_database_url))
    store = InstanceStore(node.storage_dir, node.min_free_mb * 2**20)
    scp = StorageSCP(settings, store, sessions, Intake(settings))
    lock = threading.Lock()
    scp.observers.append(_Reporter(channel, lock))
    direct = scp.direct

    def serve(sock: socket.socket, token: int, length: int, peer: tuple[str, int]) -> None:
        try:
            direct.serve_socket(sock, length, peer)
        finally:
            try:
                _send(channel, lock, {"op": "end", "token": token})
            except OSError:
                pass

    while True:
        try:
            data, fds, _, _ = socket.recv_fds(channel, MESSAGE_MAX, 1)
        except OSError:
            data, fds = b"", []
        if not data:
            break  # the serving process is gone
        message = json.loads(data)
        if message["op"] == "serve" and fds:
            sock = socket.socket(fileno=fds[0])
            peer = (str(message["host"]), int(message["port"]))
            threading.Thread(
                target=serve, args=(sock, int(message["token"]), int(message["length"]), peer), daemon=True
            ).start()
        elif message["op"] == "stop":
            direct.stop(time.monotonic() + float(message["seconds"]))
            scp.close_all("shutdown")
            try:
                _send(channel, lock, {"op": "stopped"})
            except OSError:
                pass
            break
        else:
            for fd in fds:
                os.close(fd)
    logging.shutdown()
