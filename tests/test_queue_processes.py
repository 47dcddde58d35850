"""The queue with real processes: ``kill -9`` of the node's main process mid-job.

Before the leased queue, the synthesis worker outlived its node, finished a job the restarted
node had already requeued (the job ran twice) and then crashed on "job is 'done', not running".
Now the worker exits with its parent, the restarted node requeues the job, and it runs once.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pydicom
import pytest

from storage.db import make_engine, session_factory
from storage.models import Job, Output, QueueWorker
from tests.conftest import free_port
from tests.peers import NodeProcess, node_config, storescu, wait_for
from tests.test_end_to_end import chest_cr

pytestmark = pytest.mark.slow


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


def test_kill_9_of_the_node_takes_its_worker_down_and_the_job_runs_exactly_once(
    tmp_path: Path, tiny_pixel_model_dir: Path
) -> None:
    port = free_port()
    config = node_config(tmp_path, port=port, model=tiny_pixel_model_dir, pacs_port=None, settle_s=0)
    # Enough denoising steps that the job is still running when the node is killed.
    text = config.read_text().replace("steps = 2", "steps = 12")
    config.write_text(text.replace('ae_title = "SVDRR"', 'ae_title = "SVDRR"\nname = "n1"'))
    sessions = session_factory(make_engine(f"sqlite:///{tmp_path / 'var' / 'dicomnode.sqlite'}"))
    node = NodeProcess(config, port, tmp_path / "node.log").start()
    worker_pid = None
    try:
        [path] = chest_cr(tmp_path, n=1)
        assert storescu(port, [path]).returncode == 0

        def worker_holds_the_job() -> bool:
            nonlocal worker_pid
            with sessions() as session:
                row = session.get(QueueWorker, "n1/worker-0")
                job = session.query(Job).one_or_none()
                if row is None or job is None or job.state != "running" or row.job_id != job.id:
                    return False
                worker_pid = row.pid
                return True

        wait_for(worker_holds_the_job, 120, "the worker to hold the job (heartbeat row)", interval_s=0.2)
        assert worker_pid is not None and alive(worker_pid)
        assert node.proc is not None
        os.kill(node.proc.pid, signal.SIGKILL)  # the main process only, as the OOM killer would
        node.proc.wait(30)
        wait_for(lambda: not alive(worker_pid), 10, "the orphaned worker to exit", interval_s=0.1)
        with sessions() as session:
            job = session.query(Job).one()
            assert job.state == "running", "killed mid-job"
            assert session.query(Output).count() == 0, "the orphan wrote nothing"
    finally:
        node.stop()
    first_log = node.log()
    assert "is gone; exiting" in first_log, first_log

    # A file renamed into the store just before a crash, with no row: quarantined at start-up.
    lost = tmp_path / "var" / "2026" / "01" / "01" / "renamed-before-the-crash.dcm"
    lost.parent.mkdir(parents=True, exist_ok=True)
    lost.write_bytes(path.read_bytes())
    node = NodeProcess(config, port, tmp_path / "node2.log").start()
    assert not lost.exists()
    assert (tmp_path / "var" / "quarantine" / "2026" / "01" / "01" / "renamed-before-the-crash.dcm").is_file()
    try:

        def done() -> bool:
            with sessions() as session:
                return session.query(Job).one().state == "done"

        wait_for(done, 240, "the requeued job to finish after the restart", interval_s=0.5)
        with sessions() as session:
            job = session.query(Job).one()
            outputs = session.query(Output).filter_by(job_id=job.id).all()
            assert len(outputs) == 4, "one output set: each view once"
            assert job.attempts == 0, "the node's crash is not counted against the job"
            new_pid = session.get(QueueWorker, "n1/worker-0").pid
    finally:
        assert node.terminate(120) == 0
    assert not alive(new_pid), "no worker left after a clean stop"
    logs = first_log + node.log()
    assert "not running" not in logs and "Traceback" not in logs, logs
    assert pydicom.dcmread(path).SOPInstanceUID
