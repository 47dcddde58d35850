"""The running node: storage, the SCP, the synthesis workers and the scheduler, started and stopped
in the order that loses nothing.

Start: migrate the database, discard partial files a crash left, requeue the jobs this node's
workers held when it died (deliveries still pending are simply due again), start the workers, then
accept associations. Stop (SIGTERM/SIGINT): stop accepting associations and let running ones finish,
stop the scheduler, let each worker finish its job in hand (or terminate it after a grace period and
requeue the job), exit 0.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.config import Settings
from dicomnode.delivery import deliver_due
from dicomnode.intake import Intake
from dicomnode.scp import StorageSCP
from dicomnode.workers import WorkerPool
from storage.db import make_engine, session_factory, upgrade
from storage.jobs import release_waiting_jobs
from storage.models import JOB_STATES, Job
from storage.store import InstanceStore

logger = logging.getLogger(__name__)


def model_problem(settings: Settings) -> str | None:
    """Why synthesis cannot run now (the model folder is missing), or None."""
    model = settings.engine.model
    if not model.is_dir():
        return f"synthesis waits for a model: folder {model} does not exist"
    if not (model / "model_index.json").is_file():
        return f"synthesis waits for a model: {model} has no model_index.json"
    return None


class Node:
    def __init__(self, settings: Settings, worker_grace_s: float = 60.0):
        self.settings = settings
        self.worker_grace_s = worker_grace_s
        self.stopping = threading.Event()
        self.sessions: sessionmaker[Session] | None = None
        self.scp: StorageSCP | None = None
        self.pool: WorkerPool | None = None
        self.scheduler: BackgroundScheduler | None = None
        self._model_problem: str | None = None
        self.console: Any = None  # dicomnode.console.server.ConsoleServer when [http] is enabled

    def start(self) -> None:
        s = self.settings
        s.node.storage_dir.mkdir(parents=True, exist_ok=True)
        engine = make_engine(s.node.effective_database_url)
        upgrade(engine)
        self.sessions = session_factory(engine)
        store = InstanceStore(s.node.storage_dir, s.node.min_free_mb * 2**20)
        discarded = store.discard_partial_files()
        if discarded:
            logger.warning("discarded %d partial files left by an interrupted write", discarded)
        self.pool = WorkerPool(s, self.sessions, grace_s=self.worker_grace_s)
        requeued = self.pool.requeue_own_jobs()
        if requeued:
            logger.warning("%d jobs left running by a previous run were requeued", requeued)
        self._check_model()
        self.pool.start()
        self.scheduler = BackgroundScheduler(timezone="UTC")
        every = s.scheduler.poll_interval_s
        common = {"max_instances": 1, "coalesce": True}
        self.scheduler.add_job(self._deliver, "interval", seconds=every, id="deliver", args=(store,), **common)
        self.scheduler.add_job(self._supervise, "interval", seconds=max(every, 1.0), id="supervise", **common)
        self.scheduler.start()
        self.scp = StorageSCP(s, store, self.sessions, Intake(s))
        self.scp.start()
        if s.http.enabled:
            from dicomnode.console.server import ConsoleServer  # the HTTP stack loads only when used

            self.console = ConsoleServer.for_node(s, self, store, JOB_STATES).start()
        logger.info(
            "node %s listening on %s:%d; %d synthesis worker(s); model %s",
            s.node.ae_title,
            s.node.bind_address,
            self.scp.port,
            s.scheduler.workers,
            s.engine.model,
        )

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

    def _deliver(self, store: InstanceStore) -> None:
        try:
            assert self.sessions is not None
            deliver_due(self.settings, self.sessions, store)
        except Exception:  # a scheduler job is a boundary: log, try again next tick
            logger.exception("delivery round failed")

    def _supervise(self) -> None:
        try:
            self._check_model()
            if self.pool is not None and not self.stopping.is_set():
                self.pool.supervise()
        except Exception:
            logger.exception("supervision round failed")

    def stop(self) -> None:
        self.stopping.set()
        logger.info("stopping: no new associations")
        if self.console is not None:
            self.console.stop()
        if self.scp is not None:
            self.scp.stop()
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=True)
        if self.pool is not None:
            self.pool.stop()
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
