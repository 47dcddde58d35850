"""Stopping a real ``dicomnode serve`` the way service managers and terminals do.

systemd (``KillMode=control-group``), Ctrl-C in a terminal and GNU ``timeout`` signal every process
of the node at once, the synthesis workers included. The node must still stop in order ("node
stopped" logged, exit code 0) within its grace period instead of hanging on a dead worker.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dicomnode.workers import StopLatch
from tests.conftest import free_port
from tests.peers import NodeProcess, node_config, wait_for

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    ("signum", "moment"),
    [(signal.SIGTERM, "idle"), (signal.SIGINT, "idle"), (signal.SIGINT, "importing")],
)
def test_signal_to_the_whole_process_group_stops_the_node(
    tmp_path: Path, tiny_pixel_model_dir: Path, signum: signal.Signals, moment: str
) -> None:
    port = free_port()
    config = node_config(tmp_path, port=port, model=tiny_pixel_model_dir, pacs_port=None, settle_s=0)
    node = NodeProcess(config, port, tmp_path / "node.log").start()
    assert node.proc is not None
    try:
        if moment == "idle":  # the worker loaded its model and waits for jobs, asleep on the stop signal
            started = re.compile(r"worker \S+ started \(pid")
            wait_for(lambda: started.search(node.log()), 120, "the worker to run", interval_s=0.2)
            time.sleep(1)
        else:  # the worker process is still starting Python and importing the engine
            assert not re.search(r"worker \S+ started \(pid", node.log())
        worker_pids = _children(node.proc.pid)
        assert worker_pids, "the node runs at least one worker process"
        os.killpg(node.proc.pid, signum)  # node and workers alike, as systemd and Ctrl-C do
        code = node.proc.wait(60)
    finally:
        if node.proc.poll() is None:
            os.killpg(node.proc.pid, signal.SIGKILL)
            node.proc.wait(30)
    log = node.log()
    assert code == 0, log
    assert "node stopped" in log
    if moment == "idle":  # a worker still importing dies of the signal; a running one ignores it
        assert "Traceback" not in log, "no process of the node died of the signal"
    assert "killing it" not in log, "the idle worker left on its own when told, not by SIGKILL"
    wait_for(lambda: not any(_alive(pid) for pid in worker_pids), 10, "the workers to be gone", interval_s=0.2)


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


def _wait_on(latch: StopLatch, seconds: float) -> None:
    sys.exit(0 if latch.wait(seconds) else 3)


def test_stop_latch_opens_for_live_workers_although_one_died_waiting() -> None:
    ctx = multiprocessing.get_context("spawn")
    latch = StopLatch(ctx)
    victim = ctx.Process(target=_wait_on, args=(latch, 600))
    survivor = ctx.Process(target=_wait_on, args=(latch, 600))
    victim.start()
    survivor.start()
    time.sleep(3)  # both asleep on the latch
    assert not latch.is_set()
    os.kill(victim.pid, signal.SIGKILL)
    victim.join(10)
    t0 = time.monotonic()
    latch.set()  # a multiprocessing.Event hangs here for ever
    assert time.monotonic() - t0 < 1
    assert latch.is_set()
    survivor.join(30)
    assert survivor.exitcode == 0, "the live worker saw the latch open (not its 600 s timeout)"
