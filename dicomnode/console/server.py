"""The console's HTTP server: uvicorn in a thread of the node process, started and stopped with it.

Started after the SCP (so ``/readyz`` can see it listen), stopped first. Serves HTTPS with the
node's certificate when ``http.tls`` is set. The SCP counters of :mod:`dicomnode.console.metrics`
are bound to the SCP here.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import uvicorn

from dicomnode.config import Settings
from dicomnode.console.app import create_app
from dicomnode.console.metrics import build_registry
from dicomnode.console.state import ConsoleContext
from dicomnode.errors import ConfigError

logger = logging.getLogger(__name__)


class ConsoleServer:
    """Serve ``ctx`` on ``settings.http`` until :meth:`stop`."""

    def __init__(self, ctx: ConsoleContext) -> None:
        self.ctx = ctx
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None

    @classmethod
    def for_node(cls, settings: Settings, node: Any, store: Any, job_states: tuple[str, ...]) -> ConsoleServer:
        """A console over a started :class:`dicomnode.node.Node`, its SCP counters bound."""
        from dicomnode.node import model_problem

        def scp_listening() -> bool:
            return node.scp is not None and node.scp.listening

        ctx = ConsoleContext(
            settings=settings,
            sessions=node.sessions,
            store=store,
            scp_listening=scp_listening,
            model_problem=lambda: model_problem(settings),
        )
        ctx.registry, scp_metrics = build_registry(node.sessions, store, job_states, ctx.model_identity)
        if node.scp is not None:
            scp_metrics.bind(node.scp)
        return cls(ctx)

    @property
    def port(self) -> int:
        """The port listened on (the configured one until started; the real one with port 0)."""
        if self._socket is not None:
            return int(self._socket.getsockname()[1])
        return self.ctx.settings.http.port

    def start(self, timeout_s: float = 30.0) -> ConsoleServer:
        http = self.ctx.settings.http
        security = self.ctx.settings.security
        tls: dict[str, Any] = {}
        if http.tls:
            if security.tls_certificate is None or security.tls_private_key is None:
                raise ConfigError("http.tls: needs security.tls_certificate and security.tls_private_key")
            tls = {"ssl_certfile": str(security.tls_certificate), "ssl_keyfile": str(security.tls_private_key)}
        config = uvicorn.Config(
            create_app(self.ctx),
            host=http.bind_address,
            port=http.port,
            log_level="warning",
            access_log=False,  # URLs carry no patient data, but the audit table is the record of actions
            lifespan="off",
            **tls,
        )
        self._socket = _listen(http.bind_address, http.port)  # here, so a taken port fails the start
        self._server = uvicorn.Server(config)
        sockets = [self._socket]
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": sockets}, name="console-http", daemon=True
        )
        self._thread.start()
        _wait(lambda: self._server is not None and self._server.started, timeout_s, self._thread)
        scheme = "https" if http.tls else "http"
        logger.info("console at %s://%s:%d/", scheme, http.bind_address, self.port)
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        if self._server is None or self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(timeout_s)
        self._server = None
        if self._socket is not None:
            self._socket.close()
        logger.info("console stopped")


def _listen(host: str, port: int) -> socket.socket:
    """A bound TCP socket for the console (uvicorn listens on it); ConfigError naming the key if not."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"http.port: cannot listen on {host}:{port}: {e}") from e
    sock.set_inheritable(True)
    return sock


def _wait(ready: Callable[[], bool], timeout_s: float, thread: threading.Thread) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if not thread.is_alive():
            raise ConfigError("http.port: the console could not start (address in use?); see the log")
        if time.monotonic() > deadline:
            raise ConfigError(f"http: the console did not start within {timeout_s:g} s")
        time.sleep(0.02)
