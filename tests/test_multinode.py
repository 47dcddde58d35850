"""Several nodes on one database and one store, as real ``dicomnode serve`` processes.

PostgreSQL: two edges and two workers, each with its own configuration and node name, a fresh
schema of the ``test`` database, and one store that each node mounts at its own path (symlinks).
20 inputs go to both edges with dcmtk ``storescu``; one worker node is SIGKILLed (node and workers
at once, as a host dies) while it holds a job, and its job is reclaimed by the other when the lease
runs out. SQLite: the same flow on one node (role ``all``), with the synthesis worker process
SIGKILLed mid-job. Then in both: every job done exactly once (one output set each), a real Orthanc
holds exactly the expected instances, no delivery was sent twice, no process is left behind.
(The nodes share the loopback interface here; separate network namespaces are not used.)
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import text

from storage.db import make_engine, session_factory
from storage.models import Delivery, Job, Output, QueueWorker
from tests.conftest import free_port
from tests.peers import Orthanc, storescu, wait_for
from tests.storage_dbs import POSTGRES_URL
from tests.test_end_to_end import chest_cr
from tests.test_queue_processes import alive

pytestmark = pytest.mark.slow

N_INPUTS = 20
AZIMUTHS = [30.0]


@pytest.fixture()
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    pacs = Orthanc(tmp_path / "orthanc").start()
    yield pacs
    pacs.stop()


@pytest.fixture()
def pg_url() -> Iterator[str]:
    schema = f"multinode_{uuid.uuid4().hex[:12]}"
    admin = make_engine(POSTGRES_URL)
    try:
        with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    except Exception as e:  # noqa: BLE001
        admin.dispose()
        pytest.skip(f"PostgreSQL at {POSTGRES_URL} is not reachable: {e}")
    try:
        yield f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    finally:
        with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


class Node:
    """One ``dicomnode serve`` process with its own configuration file."""

    def __init__(self, folder: Path, name: str, role: str, store: Path, database_url: str, model: Path, pacs: int):
        self.name, self.role = name, role
        self.port = free_port()
        folder.mkdir(parents=True, exist_ok=True)
        mount = folder / "store"  # this node's own mount point of the shared store
        mount.symlink_to(store)
        self.config = folder / "dicomnode.toml"
        self.config.write_text(
            f"""
[node]
ae_title = "SVDRR"
name = "{name}"
role = "{role}"
bind_address = "127.0.0.1"
port = {self.port}
storage_dir = "{mount}"
database_url = "{database_url}"
min_free_mb = 1

[engine]
model = "{model}"
steps = 2

[scheduler]
settle_s = 0
poll_interval_s = 0.2
backoff_initial_s = 0.5
backoff_max_s = 2
lease_s = 5

[http]
port = {free_port()}

[[peers]]
name = "pacs"
ae_title = "ORTHANC"
host = "127.0.0.1"
port = {pacs}

[[rules]]
name = "chest"
modalities = ["CR", "DX"]
azimuths = {AZIMUTHS}
destinations = ["pacs"]
"""
        )
        self.log = folder / "node.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Node:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dicomnode", "serve", "--config", str(self.config)],
            stdout=open(self.log, "ab"),  # noqa: SIM115 - closed with the process
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        if self.role != "worker":
            wait_for(lambda: "listening on" in self.log.read_text(), 90, f"{self.name} to listen", interval_s=0.3)
        return self

    def kill_host(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None  # never started, or killed on purpose
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            raise

    def text(self) -> str:
        return self.log.read_text(errors="replace")


def _send_inputs(tmp_path: Path, edges: list[Node]) -> list[Path]:
    files = chest_cr(tmp_path, n=N_INPUTS)
    for i, edge in enumerate(edges):
        share = files[i :: len(edges)]
        result = storescu(edge.port, share)
        assert result.returncode == 0, result.stderr
    return files


def _holder_pid(sessions, worker_id: str) -> int | None:  # noqa: ANN001
    """The pid of ``worker_id`` while it holds a running job (its lease), else None."""
    with sessions() as session:
        holds = session.query(Job).filter_by(state="running", claimed_by=worker_id).count()
        row = session.get(QueueWorker, worker_id)
        return row.pid if holds and row is not None and row.stopped_at is None else None


def _check_outcome(sessions, orthanc: Orthanc, nodes: list[Node], files: list[Path]) -> None:  # noqa: ANN001
    n_outputs = N_INPUTS * len(AZIMUTHS)

    def finished() -> bool:
        with sessions() as session:
            jobs = session.query(Job).all()
            sent = session.query(Delivery).filter_by(state="sent").count()
        return len(jobs) == N_INPUTS and all(j.state == "done" for j in jobs) and sent == n_outputs

    wait_for(finished, 600, "every job done and every output delivered", interval_s=1.0)
    with sessions() as session:
        per_job = Counter(o.job_id for o in session.query(Output))
        assert sorted(per_job.values()) == [len(AZIMUTHS)] * N_INPUTS, "one output set per job"
        derived_uids = {d.output_instance.sop_instance_uid for d in session.query(Delivery)}
        sources = {j.input_instance.sop_instance_uid for j in session.query(Job)}
        pids = [w.pid for w in session.query(QueueWorker)]
    assert sources == {pydicom.dcmread(f).SOPInstanceUID for f in files}
    assert set(orthanc.get("/instances")) and len(orthanc.get("/instances")) == n_outputs
    held = {orthanc.get(f"/instances/{i}")["MainDicomTags"]["SOPInstanceUID"] for i in orthanc.get("/instances")}
    assert held == derived_uids, "Orthanc holds exactly the derived instances, none missing"
    logs = "".join(node.text() for node in nodes)
    sent_lines = re.findall(r"delivery (\d+) to pacs sent", logs)
    assert len(sent_lines) == n_outputs and len(set(sent_lines)) == n_outputs, "no delivery sent twice"
    codes = [node.stop() for node in nodes]
    assert all(code in (0, None) for code in codes), codes  # SIGTERM: a clean stop everywhere
    assert not [pid for pid in pids if alive(pid)], "no process left behind"


def test_two_edges_two_workers_on_postgresql_survive_a_dead_worker_host(
    tmp_path: Path, orthanc: Orthanc, pg_url: str, tiny_pixel_model_dir: Path
) -> None:
    store = tmp_path / "nfs-export"
    store.mkdir()
    common = {"store": store, "database_url": pg_url, "model": tiny_pixel_model_dir, "pacs": orthanc.dicom_port}
    edges = [Node(tmp_path / f"edge-{i}", f"edge-{i}", "edge", **common) for i in (1, 2)]
    workers = [Node(tmp_path / f"gpu-{i}", f"gpu-{i}", "worker", **common) for i in (1, 2)]
    nodes = edges + workers
    try:
        edges[0].start()  # migrates the schema first
        for node in nodes[1:]:
            node.start()
        files = _send_inputs(tmp_path, edges)
        sessions = session_factory(make_engine(pg_url))
        victim = workers[0]
        wait_for(lambda: _holder_pid(sessions, "gpu-1/worker-0"), 180, "gpu-1 to hold a job", interval_s=0.2)
        victim.kill_host()
        _check_outcome(sessions, orthanc, nodes, files)
    finally:
        for node in nodes:
            if node.proc is not None and node.proc.poll() is None:
                os.killpg(node.proc.pid, signal.SIGKILL)
    reclaimed = "".join(node.text() for node in nodes if node is not victim)
    assert "reclaimed" in reclaimed, "the dead host's job was taken back by another node"


def test_single_node_on_sqlite_survives_a_killed_worker(
    tmp_path: Path, orthanc: Orthanc, tiny_pixel_model_dir: Path
) -> None:
    store = tmp_path / "var"
    store.mkdir()
    node = Node(
        tmp_path / "one", "one", "all", store, f"sqlite:///{tmp_path / 'node.sqlite'}", tiny_pixel_model_dir,
        orthanc.dicom_port,
    )
    try:
        node.start()
        files = _send_inputs(tmp_path, [node])
        sessions = session_factory(make_engine(f"sqlite:///{tmp_path / 'node.sqlite'}"))
        pid = wait_for(lambda: _holder_pid(sessions, "one/worker-0"), 180, "the worker to hold a job", interval_s=0.2)
        os.kill(pid, signal.SIGKILL)
        _check_outcome(sessions, orthanc, [node], files)
    finally:
        if node.proc is not None and node.proc.poll() is None:
            os.killpg(node.proc.pid, signal.SIGKILL)
    assert "exited with code -9; restarting it" in node.text()
