"""The console's database reads and its metrics collector, on SQLite and PostgreSQL alike."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.console import audit, queries
from dicomnode.console.metrics import DatabaseCollector
from storage.associations import record_association
from storage.deliveries import DeliveryTarget, create_deliveries, mark_failed, mark_sent
from storage.jobs import claim_next_job, complete_job, enqueue_job
from storage.models import JOB_STATES, Delivery, Job, utcnow
from storage.outputs import record_output
from storage.store import InstanceStore
from tests import storage_dbs
from tests.storage_dbs import add_instance

db_url = storage_dbs.db_url
db_engine = storage_dbs.db_engine
db_sessions = storage_dbs.db_sessions

PACS = DeliveryTarget("pacs", "ORTHANC", "127.0.0.1", 4242)
VIEWER = DeliveryTarget("viewer", "VIEWER", "127.0.0.1", 4243)


def _site(sessions: sessionmaker[Session]) -> dict[str, int]:
    """One input whose job is done with two views (pacs: sent twice; viewer: one failed), one input no
    rule took, one rejected association."""
    now = utcnow()
    with sessions.begin() as session:
        assoc = record_association(
            session, calling_ae="MOD", called_ae="SVDRR", peer_host="10.0.0.9", peer_port=5000, accepted=True
        )
        record_association(
            session, calling_ae="BAD", called_ae="X", peer_host="10.0.0.8", peer_port=5001, accepted=False,
            reason="called AE 'X' is not 'SVDRR'",
        )
        source = add_instance(session, 1, received_at=now, association_id=assoc.id, calling_ae="MOD")
        add_instance(session, 2, received_at=now, modality="CT")
        job = enqueue_job(
            session, input_instance_id=source.id, rule_name="chest", azimuths=[-30, 30], elevations=[0, 0],
            destinations=["pacs", "viewer"], request_key="k1", now=now - timedelta(seconds=10),
            not_before=now - timedelta(seconds=10),
        )
        job_id, source_id = job.id, source.id
    claim_next_job(sessions, "w0", now=now - timedelta(seconds=9))
    with sessions.begin() as session:
        views = []
        for i, azimuth in enumerate((-30.0, 30.0)):
            view = add_instance(session, 10 + i, origin="derived", synthetic=True, modality="OT")
            record_output(
                session, job_id=job_id, instance_id=view.id, azimuth=azimuth, elevation=0.0, seed=0,
                model_name="demo", model_identity="ab" * 32, steps=20, guidance_scale=1.5,
                series_instance_uid="1.2.3.9", synthesis_s=0.2 + i, total_s=3.0,
            )
            views.append(view.id)
        complete_job(session, job_id, now=now)
        for view_id in views:
            pacs, viewer = create_deliveries(session, view_id, [PACS, VIEWER])
            mark_sent(session, pacs.id, 0x0000)
        mark_failed(session, viewer.id, "connection refused", timedelta(seconds=5), max_attempts=1)
    return {"job": job_id, "source": source_id}


def test_studies_job_detail_deliveries_and_associations(db_sessions: sessionmaker[Session]) -> None:
    site = _site(db_sessions)
    with db_sessions() as session:
        rows = queries.studies(session)
        assert [(r["input"]["modality"], r["state"]) for r in rows] == [("CT", "not processed"), ("CR", "done")]
        assert [v["azimuth"] for v in rows[1]["views"]] == [-30.0, 30.0]
        assert [r["job_id"] for r in queries.studies(session, state="done")] == [site["job"]]
        assert queries.studies(session, since=utcnow() + timedelta(days=1)) == []
        assert "not processed" in queries.job_states(session)

        detail = queries.job_detail(session, site["job"])
        assert detail is not None and detail["association"]["calling_ae"] == "MOD"
        assert [len(o["deliveries"]) for o in detail["job"]["outputs"]] == [2, 2]
        assert detail["timings"]["running_s"] is not None and detail["timings"]["total_s"] >= 9
        assert queries.job_detail(session, 999) is None

        all_deliveries = queries.deliveries(session)
        assert {(d["peer"], d["state"]) for d in all_deliveries} == {
            ("pacs", "sent"), ("viewer", "pending"), ("viewer", "failed")
        }
        assert [d["status"] for d in queries.deliveries(session, peer="pacs")] == ["0x0000", "0x0000"]
        assert len(queries.delivery_ids(session, "failed")) == 1
        assert queries.delivery_facets(session) == (["failed", "pending", "sent"], ["pacs", "viewer"])

        rejected = queries.associations(session, accepted=False)
        assert [a["reason"] for a in rejected] == ["called AE 'X' is not 'SVDRR'"]
        day = queries.last_24h(session)
        assert (day["received"], day["jobs_finished"], day["views_synthesised"], day["deliveries_sent"]) == (2, 1, 2, 2)
        assert queries.latest_model_identity(session) == "ab" * 32
        assert queries.counts_by_state(session, Job.state) == {"done": 1}
        assert queries.counts_by_state(session, Delivery.state) == {"sent": 2, "pending": 1, "failed": 1}
        errors = queries.recent_errors(session)
        assert [(e["kind"], e["error"]) for e in errors] == [("delivery", "connection refused")]


def test_database_collector_counts_what_the_tables_hold(db_sessions: sessionmaker[Session], tmp_path: Path) -> None:
    _site(db_sessions)
    registry = CollectorRegistry()
    registry.register(DatabaseCollector(db_sessions, InstanceStore(tmp_path, 0), JOB_STATES, lambda: "ab" * 32))
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for s in family.samples
    }
    assert samples[("dicomnode_jobs", (("state", "done"),))] == 1
    assert samples[("dicomnode_jobs", (("state", "queued"),))] == 0
    assert samples[("dicomnode_job_duration_seconds_count", ())] == 1
    assert samples[("dicomnode_synthesis_seconds_per_view_count", ())] == 2
    assert abs(samples[("dicomnode_synthesis_seconds_per_view_sum", ())] - 1.4) < 1e-9
    assert samples[("dicomnode_synthesis_seconds_per_view_bucket", (("le", "0.25"),))] == 1
    assert samples[("dicomnode_deliveries_total", (("peer", "pacs"), ("result", "sent")))] == 2
    assert samples[("dicomnode_deliveries_total", (("peer", "viewer"), ("result", "failed")))] == 1
    assert ("dicomnode_deliveries_total", (("peer", "viewer"), ("result", "pending"))) not in samples
    assert samples[("dicomnode_model_info", (("identity", "ab" * 32),))] == 1


def test_audit_rows_round_trip(db_sessions: sessionmaker[Session]) -> None:
    first = audit.record(db_sessions, actor="admin", remote_addr="10.0.0.1", action="delivery.resend",
                         target="delivery 3", outcome="ok", detail={"peer": "pacs"})
    audit.record(db_sessions, actor="token", remote_addr=None, action="peer.echo", target="peer pacs",
                 outcome="failed")
    with db_sessions() as session:
        rows = audit.recent(session)
    assert [r["action"] for r in rows] == ["peer.echo", "delivery.resend"]
    assert rows[1]["id"] == first and rows[1]["detail"] == {"peer": "pacs"} and rows[1]["at"].tzinfo is not None


def test_workers_from_their_heartbeats(db_sessions: sessionmaker[Session]) -> None:
    from storage.heartbeats import beat, stopped

    now = utcnow()
    with db_sessions.begin() as session:
        source = add_instance(session, 1)
        job = enqueue_job(session, input_instance_id=source.id, rule_name="r", azimuths=[30], elevations=[0],
                          destinations=[], request_key="k", now=now - timedelta(seconds=5),
                          not_before=now - timedelta(seconds=5))
    claim_next_job(db_sessions, "a/worker-0", now=now)
    with db_sessions.begin() as session:
        beat(session, "edge-a", node="a", role="edge", host="h1", pid=10, job_id=job.id, started=True, now=now)
        beat(session, "edge-a", node="a", role="edge", host="h1", pid=10, started=True, now=now)
        beat(session, "a/worker-0", node="a", role="worker", host="h1", pid=11, job_id=job.id, started=True,
             now=now - timedelta(seconds=120))
        beat(session, "b/worker-0", node="b", role="worker", host="h2", pid=12, started=True, now=now)
        stopped(session, "b/worker-0", now=now)
    with db_sessions() as session:
        rows = {w["id"]: w for w in queries.workers(session, lease_s=60, now=now)}
    assert rows["edge-a"]["alive"] and rows["edge-a"]["role"] == "edge"
    assert not rows["a/worker-0"]["alive"] and rows["a/worker-0"]["job_id"] == job.id  # silent past its lease
    assert rows["a/worker-0"]["heartbeat_age_s"] == 120
    assert not rows["b/worker-0"]["alive"] and rows["b/worker-0"]["stopped_at"] is not None
    with db_sessions.begin() as session:
        session.get(Job, job.id).state = "done"  # finished since that heartbeat
    with db_sessions() as session:
        rows = {w["id"]: w for w in queries.workers(session, lease_s=60, now=now)}
    assert rows["a/worker-0"]["job_id"] is None
