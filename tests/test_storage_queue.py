"""The leased queue (storage/queue.py) on a SQLite file and on PostgreSQL: retry policy, leases,
fencing tokens, reclaim across nodes, atomic delivery claims, priority ordering."""

from __future__ import annotations

import multiprocessing as mp
import random
import threading
import time
from datetime import datetime, timedelta

import pytest
from sqlalchemy.orm import Session, sessionmaker

from storage.db import make_engine, session_factory
from storage.deliveries import (
    DeliveryTarget,
    claim_deliveries,
    create_deliveries,
    mark_sent,
    reclaim_expired_deliveries,
    resend_failed,
)
from storage.heartbeats import beat, list_workers
from storage.jobs import (
    claim_jobs,
    claim_next_job,
    complete_job,
    enqueue_job,
    fail_leased_job,
    get_job,
    lease_of,
    reclaim_expired_jobs,
    requeue_running_jobs,
)
from storage.models import Delivery, utcnow
from storage.queue import DELIVERIES, JOBS, LeaseLost, RetryPolicy
from tests import storage_dbs
from tests.storage_dbs import add_instance, at

db_url = storage_dbs.db_url
db_engine = storage_dbs.db_engine
db_sessions = storage_dbs.db_sessions

def _at(hour: int, minute: int, second: int) -> datetime:
    return at(hour, minute) + timedelta(seconds=second)


POLICY = RetryPolicy(max_attempts=3, initial_s=10, max_s=60)
PACS = DeliveryTarget(peer_name="pacs", peer_ae="PACS", peer_host="127.0.0.1", peer_port=104)
OTHER = DeliveryTarget(peer_name="other", peer_ae="OTHER", peer_host="127.0.0.1", peer_port=105)


def _jobs(sessions: sessionmaker[Session], n: int, **kwargs: object) -> list[int]:
    with sessions.begin() as session:
        instance = add_instance(session, 1)
        return [
            enqueue_job(
                session,
                input_instance_id=instance.id,
                rule_name="chest",
                azimuths=[30.0],
                elevations=[0.0],
                destinations=["pacs"],
                request_key=f"k{i}",
                not_before=at(8),
                **kwargs,  # type: ignore[arg-type]
            ).id
            for i in range(n)
        ]


def _deliveries(sessions: sessionmaker[Session], n: int, targets: list[DeliveryTarget] | None = None) -> list[int]:
    with sessions.begin() as session:
        ids = []
        for i in range(n):
            instance = add_instance(session, 100 + i, origin="derived")
            ids += [d.id for d in create_deliveries(session, instance.id, targets or [PACS], now=at(8))]
        return ids


# ------------------------------------------------------------------------------ retry policy
def test_retry_policy_backoff_cap_jitter_and_permanent_errors() -> None:
    policy = RetryPolicy(max_attempts=4, initial_s=10, max_s=60)
    assert [policy.backoff_s(a) for a in (1, 2, 3, 4, 5)] == [10, 20, 40, 60, 60]
    jittery = RetryPolicy(max_attempts=4, initial_s=10, max_s=60, jitter=0.5)
    delays = {jittery.backoff_s(3, random.Random(seed)) for seed in range(50)}
    assert all(20 <= d <= 40 for d in delays) and len(delays) > 10
    assert not policy.gives_up(3) and policy.gives_up(4)
    assert policy.gives_up(1, retryable=False)
    assert policy.gives_up(2, max_attempts=2)  # a row's own max_attempts wins
    with pytest.raises(ValueError, match="jitter"):
        RetryPolicy(jitter=1.5)
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)


# ------------------------------------------------------------------------------ leases
def test_claim_gives_a_lease_and_priority_beats_age(db_sessions: sessionmaker[Session]) -> None:
    routine = _jobs(db_sessions, 2)
    with db_sessions.begin() as session:
        instance = add_instance(session, 2)
        stat = enqueue_job(
            session, input_instance_id=instance.id, rule_name="stat", azimuths=[0], elevations=[0],
            destinations=[], request_key="stat", not_before=at(8, 30), priority=10,
        ).id
    first = claim_next_job(db_sessions, "node-a/worker-0", now=at(9), lease_s=30)
    assert first is not None and first.id == stat  # newer but higher priority
    lease = lease_of(first)
    assert lease.token == 1 and lease.expires_at == at(9) + timedelta(seconds=30)
    assert first.heartbeat_at == at(9)
    rest = claim_jobs(db_sessions, "node-a/worker-0", limit=5, now=at(9))
    assert [j.id for j in rest] == routine  # then by age
    assert claim_next_job(db_sessions, "node-b/worker-0", now=at(9)) is None


def test_heartbeat_extends_the_lease_and_a_live_lease_is_not_reclaimed(db_sessions: sessionmaker[Session]) -> None:
    _jobs(db_sessions, 1)
    job = claim_next_job(db_sessions, "a", now=at(9), lease_s=60)
    assert job is not None
    lease = lease_of(job)
    with db_sessions.begin() as session:
        lease = JOBS.heartbeat(session, lease, 60, now=at(9, 1))
    assert lease.expires_at == at(9, 2)
    with db_sessions.begin() as session:
        assert reclaim_expired_jobs(session, POLICY, now=_at(9, 1, 59)) == []
        assert get_job(session, job.id).state == "running"
    with db_sessions.begin() as session:
        done = complete_job(session, job.id, now=_at(9, 1, 30), lease=lease)
        assert done.state == "done" and done.claimed_by is None and done.lease_expires_at is None


def test_expired_lease_is_reclaimed_by_another_node_and_the_old_holder_is_fenced(
    db_sessions: sessionmaker[Session],
) -> None:
    _jobs(db_sessions, 1)
    job = claim_next_job(db_sessions, "host-a/worker-0", now=at(9), lease_s=60)
    assert job is not None
    old = lease_of(job)
    with db_sessions.begin() as session:  # host B's reclaim round, after host A went silent
        assert reclaim_expired_jobs(session, POLICY, now=at(9, 2)) == [job.id]
        row = get_job(session, job.id)
        assert row.state == "queued" and row.attempts == 1 and row.claimed_by is None
        assert row.not_before == at(9, 2) + timedelta(seconds=10) and "host-a/worker-0" in (row.last_error or "")
    again = claim_next_job(db_sessions, "host-b/worker-0", now=at(9, 3))
    assert again is not None and lease_of(again).token == old.token + 2  # reclaim and claim both move it
    for write in (
        lambda s: complete_job(s, job.id, now=at(9, 3), lease=old),
        lambda s: fail_leased_job(s, old, "late", POLICY, now=at(9, 3)),
        lambda s: JOBS.heartbeat(s, old, 60, now=_at(9, 0, 30)),
        lambda s: JOBS.fence(s, old, now=_at(9, 0, 30)),
    ):
        with pytest.raises(LeaseLost, match="no longer holds it"), db_sessions.begin() as session:
            write(session)
    with db_sessions() as session:
        row = get_job(session, job.id)
        assert row.state == "running" and row.claimed_by == "host-b/worker-0"


def test_expired_but_not_yet_reclaimed_lease_cannot_write(db_sessions: sessionmaker[Session]) -> None:
    _jobs(db_sessions, 1)
    job = claim_next_job(db_sessions, "a", now=at(9), lease_s=60)
    assert job is not None
    with pytest.raises(LeaseLost), db_sessions.begin() as session:
        complete_job(session, job.id, now=_at(9, 1, 1), lease=lease_of(job))


def test_restart_requeue_moves_the_token(db_sessions: sessionmaker[Session]) -> None:
    _jobs(db_sessions, 1)
    job = claim_next_job(db_sessions, "n/worker-0", now=at(9))
    assert job is not None
    with db_sessions.begin() as session:
        assert requeue_running_jobs(session, now=_at(9, 0, 10), claimed_by=["n/worker-0", "n/worker-1"]) == 1
    with pytest.raises(LeaseLost), db_sessions.begin() as session:
        complete_job(session, job.id, now=_at(9, 0, 20), lease=lease_of(job))
    with db_sessions() as session:
        assert get_job(session, job.id).attempts == 0  # a crash of the node is not the job's fault


def test_reclaim_counts_attempts_until_the_dead_letter_state(db_sessions: sessionmaker[Session]) -> None:
    _jobs(db_sessions, 1, max_attempts=2)
    now = at(9)
    for _attempt in (1, 2):
        job = claim_next_job(db_sessions, "crashy", now=now, lease_s=10)
        assert job is not None
        now += timedelta(seconds=11)
        with db_sessions.begin() as session:
            assert reclaim_expired_jobs(session, POLICY, now=now) == [job.id]
        now += timedelta(minutes=5)
    with db_sessions() as session:
        row = get_job(session, job.id)
        assert row.state == "failed" and row.attempts == 2 and row.finished_at is not None


def test_permanent_error_fails_at_once(db_sessions: sessionmaker[Session]) -> None:
    _jobs(db_sessions, 1)
    job = claim_next_job(db_sessions, "w", now=at(9))
    assert job is not None
    with db_sessions.begin() as session:
        row = fail_leased_job(session, lease_of(job), "not a radiograph", POLICY, retryable=False, now=at(9, 1))
        assert row.state == "failed" and row.attempts == 1


def test_fence_holds_the_row_until_commit_so_a_reclaim_waits_and_finds_nothing(
    db_url: str, db_sessions: sessionmaker[Session]
) -> None:
    """A worker fences, then writes its outputs; a reclaim racing it must not take the job."""
    _jobs(db_sessions, 1)
    job = claim_next_job(db_sessions, "a", now=at(9), lease_s=60)
    assert job is not None
    other = make_engine(db_url)
    reclaimed: list[list[int]] = []
    try:
        with db_sessions.begin() as session:
            JOBS.fence(session, lease_of(job), now=_at(9, 0, 59))
            thread = threading.Thread(
                target=lambda: reclaimed.append(_reclaim(session_factory(other), at(9, 5))), daemon=True
            )
            thread.start()
            time.sleep(1.0)  # the reclaim is blocked on our lock meanwhile
            assert reclaimed == []
            complete_job(session, job.id, now=_at(9, 0, 59), lease=lease_of(job))
        thread.join(30)
    finally:
        other.dispose()
    assert reclaimed == [[]]
    with db_sessions() as session:
        assert get_job(session, job.id).state == "done"


def _reclaim(sessions: sessionmaker[Session], now: object) -> list[int]:
    with sessions.begin() as session:
        return reclaim_expired_jobs(session, POLICY, now=now)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ deliveries
def test_delivery_claims_are_leased_and_fenced(db_sessions: sessionmaker[Session]) -> None:
    ids = _deliveries(db_sessions, 2)
    claimed = claim_deliveries(db_sessions, "edge-a/delivery", now=at(9), lease_s=30)
    assert sorted(d.id for d, _ in claimed) == ids
    assert all(d.state == "pending" and d.claimed_by == "edge-a/delivery" for d, _ in claimed)
    assert claim_deliveries(db_sessions, "edge-b/delivery", now=_at(9, 0, 10)) == []  # held
    (first, lease), (second, lease2) = sorted(claimed, key=lambda c: c[0].id)
    with db_sessions.begin() as session:
        assert mark_sent(session, first.id, 0, now=_at(9, 0, 5), lease=lease).state == "sent"
    with db_sessions.begin() as session:  # edge A died holding the second; edge B's reclaim round
        assert reclaim_expired_deliveries(session, POLICY, now=at(9, 1)) == [second.id]
    [(again, _)] = claim_deliveries(db_sessions, "edge-b/delivery", now=at(9, 2))
    assert again.id == second.id and again.attempts == 1
    with pytest.raises(LeaseLost), db_sessions.begin() as session:
        mark_sent(session, second.id, 0, now=at(9, 2), lease=lease2)


def test_resend_failed_in_bulk_per_peer(db_sessions: sessionmaker[Session]) -> None:
    _deliveries(db_sessions, 2, [PACS, OTHER])
    for _d, lease in claim_deliveries(db_sessions, "e", now=at(9)):
        with db_sessions.begin() as session:
            DELIVERIES.fail(session, lease, "refused", POLICY, retryable=False, now=at(9))
    with db_sessions.begin() as session:
        assert len(resend_failed(session, peer_name="pacs", now=at(10))) == 2
    with db_sessions() as session:
        states = {(d.peer_name, d.state, d.attempts) for d in session.query(Delivery)}
        assert states == {("pacs", "pending", 0), ("other", "failed", 1)}
    with db_sessions.begin() as session:
        assert len(resend_failed(session, now=at(10))) == 2
        assert resend_failed(session, now=at(10)) == []


def _claim_all(url: str, worker_id: str, start: object, out: object) -> None:
    """Child process: claim deliveries one by one until none is left; report the ids."""
    engine = make_engine(url)
    sessions = session_factory(engine)
    with sessions() as session:  # connected and imported before the race starts
        session.query(Delivery).count()
    start.wait()  # type: ignore[attr-defined]
    mine = []
    while claimed := claim_deliveries(sessions, worker_id, limit=3, now=utcnow()):
        mine += [d.id for d, _ in claimed]
        time.sleep(0.01)  # a sender does its sends between claims: the other gets its turn on a loaded machine
    out.put((worker_id, mine))  # type: ignore[attr-defined]
    engine.dispose()


def test_two_processes_claim_each_delivery_exactly_once(db_url: str, db_sessions: sessionmaker[Session]) -> None:
    ids = _deliveries(db_sessions, 40)
    ctx = mp.get_context("spawn")
    start, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_claim_all, args=(db_url, f"edge-{i}", start, out)) for i in range(2)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    claimed = results["edge-0"] + results["edge-1"]
    assert sorted(claimed) == sorted(ids), "every delivery claimed exactly once"
    assert results["edge-0"] and results["edge-1"], "both senders took part"


# ------------------------------------------------------------------------------ heartbeats
def test_heartbeats_list_each_node_and_worker(db_sessions: sessionmaker[Session]) -> None:
    with db_sessions.begin() as session:
        beat(session, "edge-a/node", node="edge-a", role="edge", host="h1", pid=10, now=at(9), started=True)
        beat(session, "gpu-1/worker-0", node="gpu-1", role="worker", host="h2", pid=20, job_id=7, now=at(9))
    with db_sessions.begin() as session:
        beat(session, "gpu-1/worker-0", node="gpu-1", role="worker", host="h2", pid=20, job_id=None, now=at(9, 1))
    with db_sessions() as session:
        rows = {w.worker_id: (w.role, w.heartbeat_at, w.job_id) for w in list_workers(session)}
    assert rows == {"edge-a/node": ("edge", at(9), None), "gpu-1/worker-0": ("worker", at(9, 1), None)}
