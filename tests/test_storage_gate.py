"""Refused and permanently failed jobs on both databases: terminal, recorded, never claimed again."""

from __future__ import annotations

import pytest
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.errors import StorageError
from storage.jobs import (
    claim_next_job,
    enqueue_job,
    fail_job_permanently,
    list_jobs,
    record_consistency,
    refuse_job,
    retry_job,
)
from storage.provenance import provenance_chain
from tests import storage_dbs
from tests.storage_dbs import add_instance, at

db_url = storage_dbs.db_url
db_engine = storage_dbs.db_engine
db_sessions = storage_dbs.db_sessions


def _running_job(sessions: sessionmaker[Session], key: str) -> tuple[int, str]:
    with sessions.begin() as session:
        instance = add_instance(session, 1 if key == "a" else 2)
        enqueue_job(
            session, input_instance_id=instance.id, rule_name="chest", azimuths=[30.0], elevations=[0.0],
            destinations=["pacs"], request_key=key, max_attempts=5, now=at(8),
        )  # fmt: skip
        uid = instance.sop_instance_uid
    job = claim_next_job(sessions, "w", at(9))
    assert job is not None
    return job.id, uid


def test_refused_is_terminal_with_score_and_reason(db_sessions: sessionmaker[Session]) -> None:
    job_id, uid = _running_job(db_sessions, "a")
    with db_sessions.begin() as session:
        job = refuse_job(session, job_id, "consistency score denoise 11.69 dB is below 20.70 dB", 11.69, "denoise")
        assert (job.state, job.attempts, job.consistency_method) == ("refused", 1, "denoise")
    assert claim_next_job(db_sessions, "w", at(23)) is None
    with db_sessions.begin() as session, pytest.raises(StorageError, match="'refused', not failed"):
        retry_job(session, job_id)
    with db_sessions() as session:
        (listed,) = list_jobs(session, state="refused")
        assert listed.consistency_score == pytest.approx(11.69) and "below" in listed.last_error
        (job,) = provenance_chain(session, uid).jobs
        assert job.state == "refused" and job.consistency_score == pytest.approx(11.69)


def test_permanent_failure_is_failed_after_one_attempt(db_sessions: sessionmaker[Session]) -> None:
    job_id, _ = _running_job(db_sessions, "b")
    with db_sessions.begin() as session:
        job = fail_job_permanently(session, job_id, "SynthesisError: pixel data could not be decoded")
        assert (job.state, job.attempts, job.max_attempts) == ("failed", 1, 5)
        assert job.finished_at is not None
    assert claim_next_job(db_sessions, "w", at(23)) is None


def test_a_passing_score_is_recorded(db_sessions: sessionmaker[Session]) -> None:
    job_id, _ = _running_job(db_sessions, "a")
    with db_sessions.begin() as session:
        record_consistency(session, job_id, 22.78, "denoise")
    with db_sessions() as session:
        (job,) = list_jobs(session)
        assert job.consistency_score == pytest.approx(22.78)
        assert (job.consistency_method, job.state) == ("denoise", "running")
