"""The job queue on both databases: idempotent enqueue, atomic claims, backoff, restarts."""

from __future__ import annotations

import multiprocessing
import threading
from collections import Counter
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.errors import StorageError
from storage.db import make_engine, session_factory
from storage.jobs import (
    claim_next_job,
    complete_job,
    enqueue_job,
    fail_job,
    get_job,
    list_jobs,
    release_waiting_jobs,
    requeue_running_jobs,
    retry_job,
    wait_for_model,
)
from storage.models import Job
from tests import storage_dbs
from tests.storage_dbs import add_instance, at

db_url = storage_dbs.db_url
db_engine = storage_dbs.db_engine
db_sessions = storage_dbs.db_sessions

N_JOBS = 20


def _enqueue(session: Session, instance_id: int, key: str, **kwargs: object) -> Job:
    values: dict[str, object] = {
        "rule_name": "chest-lateral",
        "azimuths": [90.0, 270.0],
        "elevations": [0.0],
        "destinations": ["pacs"],
        "max_attempts": 3,
        "now": at(8),
    }
    values.update(kwargs)
    return enqueue_job(session, input_instance_id=instance_id, request_key=key, **values)  # type: ignore[arg-type]


def _queue_jobs(sessions: sessionmaker[Session], n: int) -> list[int]:
    with sessions.begin() as session:
        instance = add_instance(session, 1)
        return [_enqueue(session, instance.id, f"key-{i}").id for i in range(n)]


def test_enqueue_is_idempotent_on_request_key(db_sessions: sessionmaker[Session]) -> None:
    with db_sessions.begin() as session:
        instance = add_instance(session, 1)
        first = _enqueue(session, instance.id, "same-key", not_before=at(8, 5))
    with db_sessions.begin() as session:
        again = _enqueue(session, instance.id, "same-key", rule_name="another-rule", azimuths=[45.0])
        other = _enqueue(session, instance.id, "other-key")
    assert again.id == first.id
    assert again.rule_name == "chest-lateral" and again.azimuths == [90.0, 270.0]
    assert again.not_before == at(8, 5)
    assert other.id != first.id
    with db_sessions() as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 2


def test_enqueue_refuses_invalid_requests(db_sessions: sessionmaker[Session]) -> None:
    with db_sessions() as session:
        instance = add_instance(session, 1)
        with pytest.raises(ValueError, match="azimuths"):
            _enqueue(session, instance.id, "k", azimuths=[])
        with pytest.raises(ValueError, match="nan"):
            _enqueue(session, instance.id, "k", elevations=[float("nan")])
        with pytest.raises(ValueError, match="max_attempts 0"):
            _enqueue(session, instance.id, "k", max_attempts=0)
        with pytest.raises(ValueError, match="destinations"):
            _enqueue(session, instance.id, "k", destinations="pacs")


def test_claim_takes_due_jobs_oldest_first_and_marks_them_running(db_sessions: sessionmaker[Session]) -> None:
    with db_sessions.begin() as session:
        instance = add_instance(session, 1)
        late = _enqueue(session, instance.id, "late", not_before=at(10)).id
        due_second = _enqueue(session, instance.id, "second", not_before=at(9)).id
        due_first = _enqueue(session, instance.id, "first", not_before=at(8, 30)).id

    first = claim_next_job(db_sessions, "worker-a", now=at(9))
    second = claim_next_job(db_sessions, "worker-a", now=at(9))
    assert claim_next_job(db_sessions, "worker-a", now=at(9)) is None

    assert first is not None and second is not None
    assert (first.id, second.id) == (due_first, due_second)
    assert first.state == "running" and first.claimed_by == "worker-a"
    assert first.claimed_at == first.started_at == at(9)
    with db_sessions() as session:
        assert get_job(session, late).state == "queued"
        assert get_job(session, due_first).state == "running"
    later = claim_next_job(db_sessions, "worker-b", now=at(10))
    assert later is not None and later.id == late


def test_two_workers_with_their_own_connections_claim_each_job_exactly_once(
    db_url: str, db_sessions: sessionmaker[Session]
) -> None:
    job_ids = _queue_jobs(db_sessions, N_JOBS)
    claimed: dict[str, list[int]] = {"worker-a": [], "worker-b": []}
    errors: list[BaseException] = []
    start = threading.Barrier(len(claimed))

    def work(worker_id: str) -> None:
        engine = make_engine(db_url)  # a pool, and so connections, of this worker's own
        try:
            sessions = session_factory(engine)
            start.wait()
            while (job := claim_next_job(sessions, worker_id, now=at(9))) is not None:
                claimed[worker_id].append(job.id)
        except BaseException as e:  # reported below, with the test's failure
            errors.append(e)
        finally:
            engine.dispose()

    threads = [threading.Thread(target=work, args=(w,)) for w in claimed]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    all_claims = claimed["worker-a"] + claimed["worker-b"]
    assert sorted(all_claims) == sorted(job_ids), Counter(all_claims).most_common(3)
    with db_sessions() as session:
        for worker_id, ids in claimed.items():
            for job_id in ids:
                job = get_job(session, job_id)
                assert (job.state, job.claimed_by) == ("running", worker_id)


def _claim_all_in_a_process(db_url: str, worker_id: str, start: Any, results: Any) -> None:
    engine = make_engine(db_url)
    sessions = session_factory(engine)
    start.wait()
    mine = []
    while (job := claim_next_job(sessions, worker_id, now=at(9))) is not None:
        mine.append(job.id)
    results.put((worker_id, mine))
    engine.dispose()


def test_two_worker_processes_claim_each_job_exactly_once(db_url: str, db_sessions: sessionmaker[Session]) -> None:
    job_ids = _queue_jobs(db_sessions, N_JOBS)
    context = multiprocessing.get_context("spawn")
    start, results = context.Barrier(2), context.Queue()
    workers = [
        context.Process(target=_claim_all_in_a_process, args=(db_url, f"process-{n}", start, results)) for n in range(2)
    ]
    for p in workers:
        p.start()
    claimed = dict(results.get(timeout=60) for _ in workers)
    for p in workers:
        p.join(timeout=30)
        assert p.exitcode == 0
    all_claims = claimed["process-0"] + claimed["process-1"]
    assert sorted(all_claims) == sorted(job_ids), Counter(all_claims).most_common(3)


def test_failures_back_off_then_fail_for_good_after_max_attempts(db_sessions: sessionmaker[Session]) -> None:
    _queue_jobs(db_sessions, 1)
    backoff = timedelta(minutes=5)
    now = at(9)
    for attempt in (1, 2):
        job = claim_next_job(db_sessions, "w", now=now)
        assert job is not None
        with db_sessions.begin() as session:
            failed = fail_job(session, job.id, f"CUDA out of memory #{attempt}", backoff, now=now)
        assert (failed.state, failed.attempts) == ("queued", attempt)
        assert failed.not_before == now + backoff
        assert failed.claimed_by is None and failed.last_error == f"CUDA out of memory #{attempt}"
        assert claim_next_job(db_sessions, "w", now=now + backoff - timedelta(seconds=1)) is None
        now = now + backoff

    job = claim_next_job(db_sessions, "w", now=now)
    assert job is not None
    with db_sessions.begin() as session:
        final = fail_job(session, job.id, "still out of memory", backoff, now=now)
    assert (final.state, final.attempts, final.finished_at) == ("failed", 3, now)
    assert claim_next_job(db_sessions, "w", now=now + timedelta(days=1)) is None
    with db_sessions() as session:
        with pytest.raises(StorageError, match="is 'failed', not running"):
            fail_job(session, job.id, "again", backoff, now=now)


def test_retry_job_gives_a_failed_job_fresh_attempts(db_sessions: sessionmaker[Session]) -> None:
    [job_id] = _queue_jobs(db_sessions, 1)
    with db_sessions.begin() as session:
        session.get_one(Job, job_id).max_attempts = 1
    assert claim_next_job(db_sessions, "w", now=at(9)) is not None
    with db_sessions.begin() as session:
        assert fail_job(session, job_id, "boom", timedelta(0), now=at(9)).state == "failed"
    with db_sessions.begin() as session:
        retried = retry_job(session, job_id, now=at(11))
    assert (retried.state, retried.attempts, retried.not_before, retried.finished_at) == ("queued", 0, at(11), None)
    with db_sessions() as session:
        with pytest.raises(StorageError, match="is 'queued', not failed"):
            retry_job(session, job_id)
        with pytest.raises(StorageError, match="job 999 does not exist"):
            retry_job(session, 999)


def test_complete_job_only_from_running(db_sessions: sessionmaker[Session]) -> None:
    [job_id] = _queue_jobs(db_sessions, 1)
    with db_sessions() as session:
        with pytest.raises(StorageError, match="is 'queued', not running"):
            complete_job(session, job_id)
    assert claim_next_job(db_sessions, "w", now=at(9)) is not None
    with db_sessions.begin() as session:
        done = complete_job(session, job_id, now=at(9, 2))
    assert (done.state, done.finished_at) == ("done", at(9, 2))
    assert claim_next_job(db_sessions, "w", now=at(12)) is None


def test_requeue_running_jobs_after_a_crash(db_sessions: sessionmaker[Session]) -> None:
    job_ids = _queue_jobs(db_sessions, 3)
    a = claim_next_job(db_sessions, "host-a", now=at(9))
    b = claim_next_job(db_sessions, "host-b", now=at(9))
    assert a is not None and b is not None

    with db_sessions.begin() as session:
        assert requeue_running_jobs(session, now=at(10), claimed_by="host-a") == 1
    with db_sessions.begin() as session:
        assert get_job(session, b.id).state == "running"
        assert requeue_running_jobs(session, now=at(10)) == 1
        assert requeue_running_jobs(session, now=at(10)) == 0

    with db_sessions() as session:
        jobs = [get_job(session, job_id) for job_id in job_ids]
    assert [j.state for j in jobs] == ["queued"] * 3
    assert all(j.claimed_by is None and j.attempts == 0 for j in jobs)
    assert all("interrupted" in (j.last_error or "") for j in jobs[:2])
    claimed = {claim_next_job(db_sessions, "w", now=at(10)).id for _ in range(3)}  # type: ignore[union-attr]
    assert claimed == set(job_ids)


def test_jobs_wait_for_a_missing_model_without_spending_attempts(db_sessions: sessionmaker[Session]) -> None:
    [job_id] = _queue_jobs(db_sessions, 1)
    assert claim_next_job(db_sessions, "w", now=at(9)) is not None
    with db_sessions.begin() as session:
        parked = wait_for_model(session, job_id, "model folder models/svdrr-512 is missing")
    assert (parked.state, parked.attempts) == ("waiting_model", 0)
    assert claim_next_job(db_sessions, "w", now=at(10)) is None
    with db_sessions.begin() as session:
        assert release_waiting_jobs(session, now=at(11)) == 1
    job = claim_next_job(db_sessions, "w", now=at(11))
    assert job is not None and job.id == job_id


def test_list_jobs_filters_by_state_and_rule(db_sessions: sessionmaker[Session]) -> None:
    with db_sessions.begin() as session:
        instance = add_instance(session, 1)
        first = _enqueue(session, instance.id, "a", now=at(8)).id
        second = _enqueue(session, instance.id, "b", now=at(9), rule_name="knee").id
    claim_next_job(db_sessions, "w", now=at(9))
    with db_sessions() as session:
        assert [j.id for j in list_jobs(session)] == [second, first]
        assert [j.id for j in list_jobs(session, state="running")] == [first]
        assert [j.id for j in list_jobs(session, rule_name="knee")] == [second]
        with pytest.raises(ValueError, match="'stuck'"):
            list_jobs(session, state="stuck")
