"""Operator commands on a real SQLite database: db upgrade, jobs --retry, deliveries --resend."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from dicomnode.cli import main
from dicomnode.cli.exitcodes import ExitCode
from storage.db import head_revision, make_engine, session_factory
from storage.deliveries import DeliveryTarget, create_deliveries, mark_failed
from storage.jobs import claim_next_job, enqueue_job, fail_job
from storage.models import Delivery, Instance, Job
from tests.conftest import free_port
from tests.peers import node_config


@pytest.fixture()
def config(tmp_path: Path) -> Path:
    path = node_config(tmp_path, port=11112, model=tmp_path / "model", pacs_port=4242)
    assert main(["db", "upgrade", "--config", str(path)]) == ExitCode.OK
    return path


def _sessions(config: Path):  # noqa: ANN202
    return session_factory(make_engine(f"sqlite:///{config.parent / 'var' / 'dicomnode.sqlite'}"))


def _instance(session, uid: str, origin: str) -> Instance:  # noqa: ANN001
    row = Instance(
        sop_instance_uid=uid,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
        study_instance_uid="1.2.3",
        series_instance_uid="1.2.3.4",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        path=f"{uid}.dcm",
        sha256="0" * 64,
        size_bytes=1,
        origin=origin,
    )
    session.add(row)
    session.flush()
    return row


def test_db_upgrade_reports_the_head_revision(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["db", "current", "--config", str(config)]) == ExitCode.OK
    assert f"revision {head_revision()}" in capsys.readouterr().out


def test_jobs_lists_and_retries_a_failed_job(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sessions = _sessions(config)
    with sessions.begin() as session:
        source = _instance(session, "1.2.3.4.5", "received")
        enqueue_job(
            session,
            input_instance_id=source.id,
            rule_name="chest",
            azimuths=[30],
            elevations=[0],
            destinations=[],
            request_key="k",
            max_attempts=1,
        )
    job = claim_next_job(sessions, "w")
    assert job is not None
    with sessions.begin() as session:
        fail_job(session, job.id, "engine exploded", timedelta(0))
    assert main(["jobs", "--config", str(config), "--state", "failed"]) == ExitCode.OK
    listing = capsys.readouterr().out
    assert "failed" in listing and "engine exploded" in listing
    assert main(["jobs", "--config", str(config), "--retry", str(job.id)]) == ExitCode.OK
    with sessions() as session:
        assert session.get_one(Job, job.id).state == "queued"
    assert main(["jobs", "--config", str(config), "--retry", "999"]) == ExitCode.NOT_FOUND


def test_deliveries_lists_and_resends(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sessions = _sessions(config)
    with sessions.begin() as session:
        output = _instance(session, "1.2.3.4.6", "derived")
        (delivery,) = create_deliveries(session, output.id, [DeliveryTarget("pacs", "ORTHANC", "127.0.0.1", 4242)])
        mark_failed(session, delivery.id, "association refused", timedelta(0), max_attempts=1)
        delivery_id = delivery.id
    assert main(["deliveries", "--config", str(config)]) == ExitCode.OK
    listing = capsys.readouterr().out
    assert "failed" in listing and "1.2.3.4.6" in listing and "association refused" in listing
    assert main(["deliveries", "--config", str(config), "--resend", str(delivery_id)]) == ExitCode.OK
    with sessions() as session:
        assert session.get_one(Delivery, delivery_id).state == "pending"
    assert main(["deliveries", "--config", str(config), "--resend", "999"]) == ExitCode.NOT_FOUND


def test_commands_refuse_a_database_that_was_never_upgraded(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = node_config(tmp_path, port=11112, model=tmp_path / "model", pacs_port=None)
    (tmp_path / "var").mkdir()
    assert main(["jobs", "--config", str(path)]) == ExitCode.FAILURE
    assert "db upgrade" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["jobs", "deliveries", "status"])
def test_reading_commands_never_create_the_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    """Before the node first starts there is no database; a status or list command says so and
    leaves no empty file behind (the node creates and migrates it when it starts)."""
    path = node_config(tmp_path, port=free_port(), model=tmp_path / "model", pacs_port=None)
    database = tmp_path / "var" / "dicomnode.sqlite"
    assert main([command, "--config", str(path)]) == ExitCode.FAILURE
    assert f"no database at {database} yet" in capsys.readouterr().err
    assert not database.exists()
    assert main(["db", "upgrade", "--config", str(path)]) == ExitCode.OK and database.is_file()


def test_deliveries_resend_failed_in_bulk_for_one_peer(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sessions = _sessions(config)
    targets = [
        DeliveryTarget(peer_name="pacs", peer_ae="ORTHANC", peer_host="127.0.0.1", peer_port=4242),
        DeliveryTarget(peer_name="archive", peer_ae="ARCHIVE", peer_host="127.0.0.1", peer_port=4243),
    ]
    with sessions.begin() as session:
        for n in range(2):
            derived = _instance(session, f"1.2.3.4.{n + 7}", "derived")
            for delivery in create_deliveries(session, derived.id, targets):
                mark_failed(session, delivery.id, "association refused", timedelta(0), max_attempts=1)
    assert main(["deliveries", "--config", str(config), "--resend-failed", "--peer", "pacs"]) == ExitCode.OK
    assert "2 failed deliveries to pacs queued again" in capsys.readouterr().out
    with sessions() as session:
        states = sorted((d.peer_name, d.state) for d in session.query(Delivery))
    assert states == [("archive", "failed"), ("archive", "failed"), ("pacs", "pending"), ("pacs", "pending")]


def test_status_lists_nodes_workers_heartbeats_and_quarantine(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from storage.heartbeats import beat
    from storage.models import utcnow

    sessions = _sessions(config)
    with sessions.begin() as session:
        beat(session, "edge-1/node", node="edge-1", role="edge", host="pacs-side", pid=11, started=True)
        beat(session, "gpu-1/worker-0", node="gpu-1", role="worker", host="gpu-box", pid=22, job_id=5,
             now=utcnow() - timedelta(minutes=10))
    quarantined = config.parent / "var" / "quarantine" / "2026" / "lost.dcm"
    quarantined.parent.mkdir(parents=True)
    quarantined.write_bytes(b"DICM")
    assert main(["status", "--config", str(config)]) == ExitCode.PEER_UNREACHABLE  # no node runs: status says so
    out = capsys.readouterr().out
    edge_line = next(line for line in out.splitlines() if "edge-1/node" in line)
    worker_line = next(line for line in out.splitlines() if "gpu-1/worker-0" in line)
    assert "edge" in edge_line and "alive" in edge_line and "pacs-side:11" in edge_line
    assert "SILENT for 6" in worker_line and "job 5" in worker_line
    assert "quarantine 1 file(s)" in out and "quarantine/2026/lost.dcm" in out
