"""Roles as real processes: an edge that cannot import torch receives and queues; a worker with no
DICOM port claims the jobs from the shared database and store and synthesises them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from storage.db import make_engine, session_factory
from storage.models import Instance, Job, Output, QueueWorker
from tests.conftest import dcmtk, free_port
from tests.peers import node_config, storescu, wait_for
from tests.test_end_to_end import chest_cr

pytestmark = pytest.mark.slow

# Run the CLI with the engine's packages made unimportable: what a base (edge) install has.
NO_ENGINE = """
import importlib.abc, sys
class NoEngine(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("torch", "diffusers", "transformers", "accelerate", "safetensors"):
            raise ImportError(f"{name} is not installed on an edge")
sys.meta_path.insert(0, NoEngine())
from dicomnode.cli import main
sys.exit(main(sys.argv[1:]))
"""


def serve(config: Path, log: Path, role: str, name: str, no_engine: bool = False) -> subprocess.Popen[bytes]:
    prefix = [sys.executable, "-c", NO_ENGINE] if no_engine else [sys.executable, "-m", "dicomnode"]
    return subprocess.Popen(
        [*prefix, "serve", "--config", str(config), "--role", role],
        stdout=open(log, "ab"),  # noqa: SIM115 - closed with the process
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "DICOMNODE_NODE__NAME": name},
    )


def echo_ok(port: int) -> bool:
    result = subprocess.run(
        [dcmtk("echoscu"), "-aet", "TESTSCU", "-aec", "SVDRR", "127.0.0.1", str(port)], capture_output=True, timeout=20
    )
    return result.returncode == 0


def test_edge_without_torch_and_worker_without_port_share_the_database(
    tmp_path: Path, tiny_pixel_model_dir: Path
) -> None:
    port = free_port()
    config = node_config(tmp_path, port=port, model=tiny_pixel_model_dir, pacs_port=None, settle_s=0)
    sessions = session_factory(make_engine(f"sqlite:///{tmp_path / 'var' / 'dicomnode.sqlite'}"))
    edge = serve(config, tmp_path / "edge.log", "edge", "edge-1", no_engine=True)
    worker = None
    try:
        wait_for(lambda: echo_ok(port), 90, "the edge to answer C-ECHO", interval_s=0.5)
        files = chest_cr(tmp_path, n=2)
        assert storescu(port, files).returncode == 0
        with sessions() as session:
            assert session.query(Instance).count() == 2
            assert {j.state for j in session.query(Job)} == {"queued"}, "an edge queues, never synthesises"
        worker = serve(config, tmp_path / "worker.log", "worker", "gpu-1")

        def all_done() -> bool:
            with sessions() as session:
                return {j.state for j in session.query(Job)} == {"done"}

        wait_for(all_done, 240, "the worker node to finish both jobs", interval_s=0.5)
        with sessions() as session:
            assert session.query(Output).count() == 2 * 4
            roles = {w.worker_id: w.role for w in session.query(QueueWorker)}
        assert roles == {"edge-1/node": "edge", "gpu-1/node": "worker", "gpu-1/worker-0": "worker"}
        assert edge.poll() is None and worker.poll() is None
    finally:
        for proc in (edge, worker):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes = [proc.wait(120) if proc is not None else 0 for proc in (edge, worker)]
    edge_log = (tmp_path / "edge.log").read_text()
    worker_log = (tmp_path / "worker.log").read_text()
    assert codes == [0, 0], edge_log + worker_log
    assert "started synthesis worker" not in edge_log and "Traceback" not in edge_log, edge_log
    assert "listening on" not in worker_log, "a worker opens no DICOM port"
