"""The pool of synthesis worker processes: one per configured worker (one per GPU).

Workers are separate processes ('spawn', so no lock or CUDA state is inherited from the SCP's
threads). The pool restarts a worker that died, after putting the job it held back in the queue,
and on shutdown lets each worker finish the job in hand for a grace period before terminating it
and requeueing that job.

Worker ids are ``<node name>/worker-<i>`` (``node.name``, unique per machine), so a node that
restarts requeues only its own workers' jobs; jobs held by other nodes' workers are reclaimed
when their leases expire (:func:`storage.jobs.reclaim_expired_jobs`, on the scheduler). Each
worker is told the node's pid and exits when the node dies.

Stopping is the node's alone: once running, workers ignore SIGINT and SIGTERM (Ctrl-C, systemd's
``KillMode=control-group`` and ``timeout`` signal every process of the node) and leave when the
pool's :class:`StopLatch` opens. (A worker still importing Python packages when the signal comes
dies of it; it holds no job yet, and the node stops all the same.) The latch is a pipe, not a
``multiprocessing.Event``: setting an Event waits for every process asleep on it to wake, so one
worker that died while waiting (SIGKILL, the OOM killer) would hang the node's shutdown for ever.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.config import Settings
from dicomnode.worker import job_policy, worker_main
from storage.jobs import fail_leased_job, lease_of, requeue_running_jobs
from storage.models import Job
from storage.queue import LeaseLost

logger = logging.getLogger(__name__)


class StopLatch:
    """A one-way stop signal for processes: the ``is_set`` / ``wait`` / ``set`` of an Event.

    The parent keeps the pipe's write end; each worker polls the read end, which reads as ready
    once the parent closes the write end (EOF). Nothing ever waits on a reader, so a dead worker
    cannot block :meth:`set`.
    """

    def __init__(self, ctx: Any) -> None:
        self._reader, self._writer = ctx.Pipe(duplex=False)
        self._set = False

    def __getstate__(self) -> dict[str, Any]:  # a worker gets the read end only, never the write end
        return {"_reader": self._reader, "_writer": None, "_set": False}

    def is_set(self) -> bool:
        return self._set or self._reader.poll(0)

    def wait(self, timeout: float | None = None) -> bool:
        return self._set or self._reader.poll(timeout)

    def set(self) -> None:
        if not self._set and self._writer is not None:
            self._writer.close()
        self._set = True


class WorkerPool:
    def __init__(self, settings: Settings, sessions: sessionmaker[Session], grace_s: float = 60.0):
        self.settings = settings
        self.sessions = sessions
        self.grace_s = grace_s
        self.ctx = mp.get_context("spawn")
        self.stop_event = StopLatch(self.ctx)
        self.processes: dict[str, Any] = {}

    def worker_ids(self) -> list[str]:
        node = self.settings.node.node_name
        return [f"{node}/worker-{i}" for i in range(self.settings.scheduler.workers)]

    def gpu_index_for(self, index: int) -> int | None:
        """With several workers, worker i takes GPU i (when the engine runs on CUDA at all)."""
        return index if self.settings.scheduler.workers > 1 else None

    def requeue_own_jobs(self) -> int:
        with self.sessions.begin() as session:
            return requeue_running_jobs(session, claimed_by=self.worker_ids())

    def start(self) -> None:
        for index, worker_id in enumerate(self.worker_ids()):
            self._spawn(index, worker_id)

    def _spawn(self, index: int, worker_id: str) -> None:
        level = logging.getLogger().getEffectiveLevel()
        proc = self.ctx.Process(
            target=worker_main,
            args=(self.settings, worker_id, self.gpu_index_for(index), self.stop_event, level, os.getpid()),
            name=worker_id,
            daemon=False,
        )
        proc.start()
        self.processes[worker_id] = proc
        logger.info("started synthesis worker %s (pid %s)", worker_id, proc.pid)

    def supervise(self) -> None:
        """Restart dead workers (their running job goes back to the queue first)."""
        if self.stop_event.is_set():
            return
        for index, worker_id in enumerate(self.worker_ids()):
            proc = self.processes.get(worker_id)
            if proc is not None and not proc.is_alive():
                logger.error("worker %s exited with code %s; restarting it", worker_id, proc.exitcode)
                self._fail_jobs_of(worker_id, proc.exitcode)
                self._spawn(index, worker_id)

    def _fail_jobs_of(self, worker_id: str, exitcode: int | None) -> None:
        """The job a worker held when it died counts as a failed attempt (with backoff), so an
        input that crashes the engine every time ends 'failed' instead of looping forever."""
        policy = job_policy(self.settings)
        with self.sessions() as session:
            running = session.scalars(select(Job).where(Job.state == "running", Job.claimed_by == worker_id)).all()
            leases = [lease_of(job) for job in running]
        for lease in leases:
            try:
                with self.sessions.begin() as session:
                    fail_leased_job(session, lease, f"worker process died (exit code {exitcode})", policy)
            except LeaseLost as e:  # expired meanwhile: the reclaim round counts it instead
                logger.info("job %d of dead worker %s: %s", lease.id, worker_id, e)

    def alive(self) -> int:
        return sum(1 for p in self.processes.values() if p.is_alive())

    def stop(self) -> None:
        self.stop_event.set()
        for worker_id, proc in self.processes.items():
            proc.join(self.grace_s)
            if proc.is_alive():  # it ignores SIGTERM (see the module doc): kill it
                logger.warning("worker %s did not finish in %.0f s; killing it", worker_id, self.grace_s)
                proc.kill()
                proc.join(10)
        requeued = self.requeue_own_jobs()
        if requeued:
            logger.info("%d interrupted jobs requeued", requeued)
