"""The pool of synthesis worker processes: one per configured worker (one per GPU).

Workers are separate processes ('spawn', so no lock or CUDA state is inherited from the SCP's
threads). The pool restarts a worker that died, after putting the job it held back in the queue,
and on shutdown lets each worker finish the job in hand for a grace period before terminating it
and requeueing that job.

Worker ids are ``<node name>/worker-<i>`` (``node.name``, unique per machine), so a node that
restarts requeues only its own workers' jobs; jobs held by other nodes' workers are reclaimed
when their leases expire (:func:`storage.jobs.reclaim_expired_jobs`, on the scheduler). Each
worker is told the node's pid and exits when the node dies.
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


class WorkerPool:
    def __init__(self, settings: Settings, sessions: sessionmaker[Session], grace_s: float = 60.0):
        self.settings = settings
        self.sessions = sessions
        self.grace_s = grace_s
        self.ctx = mp.get_context("spawn")
        self.stop_event = self.ctx.Event()
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
            if proc.is_alive():
                logger.warning("worker %s did not finish in %.0f s; terminating it", worker_id, self.grace_s)
                proc.terminate()
                proc.join(10)
        requeued = self.requeue_own_jobs()
        if requeued:
            logger.info("%d interrupted jobs requeued", requeued)
