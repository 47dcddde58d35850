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
