"""The running node: storage, the SCP, the synthesis workers and the scheduler, started and stopped
in the order that loses nothing.

A node has a role (``node.role`` or ``serve --role``): ``all`` runs everything on one box; an
``edge`` runs the SCP, intake and delivery and needs no torch; a ``worker`` runs synthesis only,
opens no DICOM port and claims jobs from the shared database. :mod:`dicomnode.scheduler` lists
every timer each role runs.

Start: migrate the database, discard partial files a crash left, quarantine store files without a
row (edge), requeue the jobs this node's workers held when it died (worker; other nodes' jobs come
back when their leases expire), start the workers, then accept associations. Stop (SIGTERM/SIGINT):
stop accepting associations and let running ones finish, stop the scheduler, let each worker finish
its job in hand (or terminate it after a grace period and requeue the job), exit 0.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from types import FrameType
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.config import Settings
from dicomnode.delivery import deliver_due, delivery_policy
from dicomnode.scheduler import CLEANUP_INTERVAL_S, Scheduler, Timer
from dicomnode.worker import job_policy
from dicomnode.workers import WorkerPool
from storage.db import make_engine, session_factory, upgrade
from storage.deliveries import reclaim_expired_deliveries
from storage.heartbeats import beat, stopped
from storage.jobs import reclaim_expired_jobs, release_waiting_jobs
from storage.models import JOB_STATES, Job
from storage.reconcile import DEFAULT_MIN_AGE_S, quarantine_unrecorded, rows_without_their_file
from storage.store import InstanceStore

logger = logging.getLogger(__name__)

PARTIAL_FILE_AGE_S = 3600.0


def model_problem(settings: Settings) -> str | None:
    """Why synthesis cannot run now (the model folder is missing), or None."""
    model = settings.engine.model
    if not model.is_dir():
        return f"synthesis waits for a model: folder {model} does not exist"
    if not (model / "model_index.json").is_file():
        return f"synthesis waits for a model: {model} has no model_index.json"
    return None


class Node:
    def __init__(self, settings: Settings, worker_grace_s: float = 60.0, role: str | None = None):
        self.settings = settings
        self.worker_grace_s = worker_grace_s
        self.role = role or settings.node.role
        self.stopping = threading.Event()
        self.sessions: sessionmaker[Session] | None = None
        self.store: InstanceStore | None = None
        self.scp: Any = None
        self.pool: WorkerPool | None = None
        self.scheduler: Scheduler | None = None
        self._model_problem: str | None = None
        self.console: Any = None  # dicomnode.console.server.ConsoleServer when [http] is enabled

    @property
    def edge(self) -> bool:
        return self.role in ("all", "edge")

    @property
    def synthesis(self) -> bool:
        return self.role in ("all", "worker")

    @property
    def node_id(self) -> str:
        return f"{self.settings.node.node_name}/node"

    def start(self) -> None:
        s = self.settings
        s.node.storage_dir.mkdir(parents=True, exist_ok=True)
        engine = make_engine(s.node.effective_database_url)
        upgrade(engine)
        self.sessions = session_factory(engine)
        self.store = store = InstanceStore(s.node.storage_dir, s.node.min_free_mb * 2**20)
        self._heartbeat(started=True)
        if self.edge:
            # One node on its own SQLite file: nobody else writes to the store, so every partial or
            # unrecorded file is a crash's. Otherwise other nodes may be mid-write: spare young files.
            alone = s.node.database_url == "" and self.role == "all"
            discarded = store.discard_partial_files(min_age_s=0 if alone else PARTIAL_FILE_AGE_S)
            if discarded:
                logger.warning("discarded %d partial files left by an interrupted write", discarded)
            self._quarantine(min_age_s=0 if alone else DEFAULT_MIN_AGE_S)
            rows_without_their_file(store, self.sessions)  # logged: what a crash before a flush left
        if self.synthesis:
            self.pool = WorkerPool(s, self.sessions, grace_s=self.worker_grace_s)
            requeued = self.pool.requeue_own_jobs()
            if requeued:
                logger.warning("%d jobs left running by a previous run were requeued", requeued)
            self._check_model()
            self.pool.start()
        self.scheduler = Scheduler(self.timers(), self.role)
        self.scheduler.start()
        if self.edge:
            from dicomnode.intake import Intake
            from dicomnode.scp import StorageSCP

            self.scp = StorageSCP(s, store, self.sessions, Intake(s))
            self.scp.start()
            logger.info("node %s (%s) listening on %s:%d", s.node.node_name, self.role, s.node.bind_address,
                        self.scp.port)
        if s.http.enabled and self.edge:
            from dicomnode.console.server import ConsoleServer  # the HTTP stack loads only when used

            self.console = ConsoleServer.for_node(s, self, store, JOB_STATES).start()
        logger.info(
            "node %s (%s): %d synthesis worker(s); model %s",
            s.node.node_name,
            self.role,
            s.scheduler.workers if self.synthesis else 0,
            s.engine.model,
        )

    def timers(self) -> list[Timer]:
        """Every periodic task of the node, each with the roles that run it (see the scheduler)."""
        s = self.settings.scheduler
        beat_s = max(1.0, s.lease_s / 3)
        return [
            Timer("supervise", max(s.poll_interval_s, 1.0), self._supervise, ("worker",)),
            Timer("deliver", s.poll_interval_s, self._deliver, ("edge",)),
            Timer("reclaim", beat_s, self._reclaim, ("all",)),
            Timer("heartbeat", beat_s, self._heartbeat, ("all",)),
            Timer("cleanup", CLEANUP_INTERVAL_S, self._cleanup, ("edge",)),
        ]

    def _check_model(self) -> None:
        problem = model_problem(self.settings)
        if problem and problem != self._model_problem:
            logger.warning("%s; instances are received and jobs queued meanwhile", problem)
        if not problem and self._model_problem:
            logger.info("model folder %s is present now", self.settings.engine.model)
        if not problem and self.sessions is not None and self._any_waiting():
            with self.sessions.begin() as session:
                release_waiting_jobs(session)
        self._model_problem = problem

    def _any_waiting(self) -> bool:
        """A read first, so the once-a-second check takes no write lock when nothing waits."""
        assert self.sessions is not None
        with self.sessions() as session:
            return session.scalar(select(Job.id).where(Job.state == "waiting_model").limit(1)) is not None

    def _deliver(self) -> None:
        assert self.sessions is not None and self.store is not None
        deliver_due(self.settings, self.sessions, self.store, f"{self.settings.node.node_name}/delivery")

    def _supervise(self) -> None:
        self._check_model()
        if self.pool is not None and not self.stopping.is_set():
            self.pool.supervise()

    def _reclaim(self) -> None:
        """Jobs and deliveries whose holders (on any node) stopped renewing their leases."""
        assert self.sessions is not None
        with self.sessions.begin() as session:
            jobs = reclaim_expired_jobs(session, job_policy(self.settings))
            deliveries = reclaim_expired_deliveries(session, delivery_policy(self.settings))
        if jobs or deliveries:
            logger.warning("reclaimed %d jobs and %d deliveries with expired leases", len(jobs), len(deliveries))

    def _heartbeat(self, started: bool = False) -> None:
        assert self.sessions is not None
        with self.sessions.begin() as session:
            beat(
                session, self.node_id, node=self.settings.node.node_name, role=self.role,
                host=socket.gethostname(), pid=os.getpid(), started=started,
            )

    def _cleanup(self) -> None:
        assert self.store is not None
        self.store.discard_partial_files(min_age_s=PARTIAL_FILE_AGE_S)
        self._quarantine()

    def _quarantine(self, min_age_s: float = DEFAULT_MIN_AGE_S) -> None:
        assert self.store is not None and self.sessions is not None
        moved = quarantine_unrecorded(self.store, self.sessions, min_age_s=min_age_s)
        if moved:
            logger.warning("%d store files without a database row moved to quarantine", len(moved))

    def stop(self) -> None:
        self.stopping.set()
        logger.info("stopping: no new associations")
        if self.console is not None:
            self.console.stop()
        if self.scp is not None:
            self.scp.stop()
        if self.scheduler is not None:
            self.scheduler.shutdown()
        if self.pool is not None:
            self.pool.stop()
        if self.sessions is not None:
            with self.sessions.begin() as session:
                stopped(session, self.node_id)
        logger.info("node stopped")

    def serve_forever(self) -> None:
        """Run until SIGTERM or SIGINT; the handler only sets an event (stopping happens here)."""
        stop = threading.Event()

        def on_signal(signum: int, frame: FrameType | None) -> None:
            logger.info("signal %s received", signal.Signals(signum).name)
            stop.set()

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()
            while not stop.wait(0.5):
                pass
        finally:
            self.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
