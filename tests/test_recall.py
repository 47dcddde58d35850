"""Recall (IHE IOCM): outputs chosen, rejection notes written and queued, outputs never sent again.

The storage-level tests run on a SQLite file and on PostgreSQL; the end-to-end test delivers real
derived instances to a real Orthanc, recalls them with ``dicomnode recall`` and checks that the
Orthanc holds a rejection note in the same study listing exactly the recalled instances.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.cli import main
from dicomnode.cli.exitcodes import ExitCode
from dicomnode.config import load_settings
from dicomnode.delivery import deliver_due
from dicomnode.derived import build_derived_instances
from dicomnode.errors import RecallError, StorageError
from dicomnode.recall import RecallSelector, execute_recall, plan_recall
from dicomnode.rejection_note import rejected_uids_of
from storage.db import make_engine, session_factory, upgrade
from storage.deliveries import DeliveryTarget, create_deliveries, due_deliveries, mark_failed, mark_sent, resend
from storage.instances import fields_from_dataset, record_instance
from storage.jobs import enqueue_job
from storage.models import Delivery, Instance, Output, Recall
from storage.outputs import record_output
from storage.store import InstanceStore
from tests import storage_dbs
from tests.peers import Orthanc, node_config
from tests.test_derived import GENERATOR, dciodvfy_errors, full_cr_source, random_views

db_url = storage_dbs.db_url
db_engine = storage_dbs.db_engine
db_sessions = storage_dbs.db_sessions

PACS = DeliveryTarget("pacs", "ORTHANC", "127.0.0.1", 4242)
ARCHIVE = DeliveryTarget("archive", "ARCHIVE", "127.0.0.1", 4243)
KOS_STORAGE = "1.2.840.10008.5.1.4.1.1.88.59"


@dataclass
class Seeded:
    """One job's derived outputs as the worker records them."""

    job_id: int
    study_uid: str
    series_uid: str
    sop_uids: list[str]
    instance_ids: list[int]


def seed_job(
    sessions: sessionmaker[Session],
    store: InstanceStore,
    folder: Path,
    name: str,
    targets: list[DeliveryTarget],
    identity: str = GENERATOR.model_identity,
) -> Seeded:
    """A received CR, a job, and three derived views stored, recorded and queued like the worker does."""
    folder.mkdir(parents=True, exist_ok=True)
    source = full_cr_source(folder / f"{name}.dcm")
    views = [(-30.0, 0.0), (0.0, 0.0), (30.0, 0.0)]
    built = build_derived_instances(source, random_views(3, 12), 12, None, None, views, GENERATOR, 1, 2, 1.5)
    with sessions.begin() as session:
        stored = store.write_dataset(source)
        fields = fields_from_dataset(source)
        fields.update(path=stored.path, sha256=stored.sha256, size_bytes=stored.size_bytes)
        source_row = record_instance(session, origin="received", **fields)
        job = enqueue_job(
            session,
            input_instance_id=source_row.id,
            rule_name="chest",
            azimuths=[v[0] for v in views],
            elevations=[v[1] for v in views],
            destinations=[t.peer_name for t in targets],
            request_key=f"key-{name}",
        )
        ids = []
        for ds, (azimuth, elevation) in zip(built, views, strict=True):
            stored = store.write_dataset(ds)
            fields = fields_from_dataset(ds)
            fields.update(path=stored.path, sha256=stored.sha256, size_bytes=stored.size_bytes, synthetic=True)
            row = record_instance(session, origin="derived", **fields)
            record_output(
                session,
                job_id=job.id,
                instance_id=row.id,
                azimuth=azimuth,
                elevation=elevation,
                seed=1,
                model_name="tiny",
                model_identity=identity,
                steps=2,
                guidance_scale=1.5,
                series_instance_uid=ds.SeriesInstanceUID,
            )
            create_deliveries(session, row.id, targets)
            ids.append(row.id)
        uids = [d.SOPInstanceUID for d in built]
        return Seeded(job.id, source.StudyInstanceUID, built[0].SeriesInstanceUID, uids, ids)


def deliveries_of(session: Session, instance_ids: list[int]) -> list[Delivery]:
    return list(
        session.scalars(select(Delivery).where(Delivery.output_instance_id.in_(instance_ids)).order_by(Delivery.id))
    )


def test_recall_by_model_writes_a_note_per_study_and_stops_every_delivery(
    db_sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    store = InstanceStore(tmp_path / "store", 0)
    a = seed_job(db_sessions, store, tmp_path / "src", "a", [PACS, ARCHIVE])
    b = seed_job(db_sessions, store, tmp_path / "src", "b", [PACS])
    other = seed_job(db_sessions, store, tmp_path / "src", "c", [PACS], identity="ab" * 32)
    with db_sessions.begin() as session:
        for d in deliveries_of(session, a.instance_ids):
            if d.peer_name == "pacs":
                mark_sent(session, d.id, 0)  # PACS acknowledged study A; the archive never did
        for d in deliveries_of(session, b.instance_ids):
            mark_failed(session, d.id, "timed out", timedelta(0), max_attempts=1)  # study B: may have arrived
        sent_a = [d.id for d in deliveries_of(session, a.instance_ids) if d.state == "sent"]

    with db_sessions() as session:
        plan = plan_recall(session, RecallSelector("model", GENERATOR.model_identity[:12]), "safety")
    assert [s.study_instance_uid for s in plan.studies] == sorted([a.study_uid, b.study_uid])
    by_study = {s.study_instance_uid: s for s in plan.studies}
    assert set(by_study[a.study_uid].sop_instance_uids) == set(a.sop_uids)
    assert [t.peer_name for t in by_study[a.study_uid].targets] == ["pacs"]  # the archive was never tried
    assert [t.peer_name for t in by_study[b.study_uid].targets] == ["pacs"]  # tried: it may hold them

    done = execute_recall(db_sessions, store, plan, requested_by="dr-test", manufacturer="dicomnode")
    assert len(done) == 2
    with db_sessions() as session:
        recalls = {r.study_instance_uid: r for r in session.scalars(select(Recall))}
        assert set(recalls) == {a.study_uid, b.study_uid}
        recall_a = recalls[a.study_uid]
        assert (recall_a.reason, recall_a.requested_by, recall_a.n_outputs) == ("safety", "dr-test", 3)
        assert recall_a.selector == f"model {GENERATOR.model_identity[:12]}"
        outputs = session.scalars(select(Output).where(Output.instance_id.in_(a.instance_ids + b.instance_ids)))
        assert all(o.recall_id is not None and o.recalled_at is not None for o in outputs)
        untouched = session.scalars(select(Output).where(Output.instance_id.in_(other.instance_ids)))
        assert all(o.recall_id is None for o in untouched), "another model's outputs stay"
        states = {(d.output_instance_id, d.peer_name): d.state for d in deliveries_of(session, a.instance_ids)}
        assert {s for (_, peer), s in states.items() if peer == "pacs"} == {"sent"}
        assert {s for (_, peer), s in states.items() if peer == "archive"} == {"cancelled"}
        assert {d.state for d in deliveries_of(session, b.instance_ids)} == {"cancelled"}
        # The note: stored, recorded, readable, listing exactly study A's outputs, queued to PACS only.
        note = session.get_one(Instance, recall_a.note_instance_id)
        assert note.sop_class_uid == KOS_STORAGE and note.study_instance_uid == a.study_uid
        assert note.origin == "derived" and note.modality == "KO"
        assert rejected_uids_of(store.open_dataset(note.path)) == set(a.sop_uids)
        note_deliveries = deliveries_of(session, [note.id])
        assert [(d.peer_name, d.state) for d in note_deliveries] == [("pacs", "pending")]
        note_b = deliveries_of(session, [recalls[b.study_uid].note_instance_id])
        assert [(d.peer_name, d.state) for d in note_b] == [("pacs", "pending")]
        # What is due now: the note, and the other model's deliveries; no recalled output.
        due = {d.output_instance_id for d in due_deliveries(session)}
        assert note.id in due and not due & set(a.instance_ids + b.instance_ids)
    with db_sessions.begin() as session:
        with pytest.raises(StorageError, match="recalled"):
            resend(session, sent_a[0])
    with db_sessions.begin() as session:
        with pytest.raises(StorageError, match="recalled"):
            create_deliveries(session, a.instance_ids[0], [ARCHIVE])
    # Running the same recall again changes nothing.
    with db_sessions() as session:
        again = plan_recall(session, RecallSelector("model", GENERATOR.model_identity), "safety")
    assert again.studies == () and set(again.already_recalled) == set(a.sop_uids + b.sop_uids)


def test_selectors_by_job_and_series_and_refusals(db_sessions: sessionmaker[Session], tmp_path: Path) -> None:
    store = InstanceStore(tmp_path / "store", 0)
    a = seed_job(db_sessions, store, tmp_path / "src", "a", [])
    b = seed_job(db_sessions, store, tmp_path / "src", "b", [])
    with db_sessions() as session:
        by_job = plan_recall(session, RecallSelector("job", str(b.job_id)), "quality")
        by_series = plan_recall(session, RecallSelector("series", a.series_uid), "quality")
        with pytest.raises(RecallError, match="no derived output"):
            plan_recall(session, RecallSelector("series", "1.2.3.4"), "quality")
        with pytest.raises(RecallError, match="no derived output"):
            plan_recall(session, RecallSelector("job", "999"), "quality")
    assert [s.sop_instance_uids for s in by_job.studies] == [tuple(b.sop_uids)]
    assert [s.sop_instance_uids for s in by_series.studies] == [tuple(a.sop_uids)]
    with pytest.raises(RecallError, match="12 hex"):
        RecallSelector("model", "3f3f")
    with pytest.raises(RecallError, match="not a number"):
        RecallSelector("job", "seven")
    done = execute_recall(db_sessions, store, by_series, requested_by="qa", manufacturer="dicomnode")
    assert [d.n_outputs for d in done] == [3] and done[0].peers == ()


@pytest.fixture()
def site(tmp_path: Path) -> Path:
    """A node configuration on a SQLite file, upgraded; the PACS port is filled in by the test."""
    return tmp_path


def _config(folder: Path, pacs_port: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = node_config(folder, port=11112, model=folder / "model", pacs_port=pacs_port)
    assert main(["db", "upgrade", "--config", str(path)]) == ExitCode.OK
    return path


def _counts(sessions: sessionmaker[Session]) -> tuple[int, ...]:
    with sessions() as session:
        return (
            session.scalar(select(func.count(Recall.id))) or 0,
            session.scalar(select(func.count(Instance.id))) or 0,
            session.scalar(select(func.count(Output.id)).where(Output.recall_id.is_not(None))) or 0,
            session.scalar(select(func.count(Delivery.id)).where(Delivery.state == "pending")) or 0,
        )


def test_recall_end_to_end_against_orthanc(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    orthanc = Orthanc(tmp_path / "orthanc").start()
    try:
        config = _config(tmp_path / "site", orthanc.dicom_port)
        settings = load_settings(config)
        engine = make_engine(settings.node.effective_database_url)
        upgrade(engine)
        sessions = session_factory(engine)
        store = InstanceStore(settings.node.storage_dir, 0)
        target = DeliveryTarget("pacs", "ORTHANC", "127.0.0.1", orthanc.dicom_port)
        a = seed_job(sessions, store, tmp_path / "src", "a", [target])
        kept = seed_job(sessions, store, tmp_path / "src", "kept", [target])
        assert deliver_due(settings, sessions, store) == 6  # real C-STOREs, acknowledged by Orthanc
        assert len(orthanc.get("/instances")) == 6

        # --dry-run says what would happen and changes nothing, in the database or the store.
        before, files = _counts(sessions), sorted(store.root.rglob("*.dcm"))
        assert main(["recall", "--config", str(config), "--job", str(a.job_id), "--dry-run"]) == ExitCode.OK
        printed = capsys.readouterr().out
        assert "would recall 3 output(s)" in printed and "pacs" in printed and "nothing changed" in printed
        assert _counts(sessions) == before and sorted(store.root.rglob("*.dcm")) == files

        args = ["recall", "--config", str(config), "--job", str(a.job_id), "--reason", "safety", "--by", "qa"]
        assert main(args) == ExitCode.OK
        printed = capsys.readouterr().out
        assert "recall 1: rejection note" in printed and "queued to pacs" in printed
        assert deliver_due(settings, sessions, store) == 1  # the note, and nothing else

        # Orthanc holds the note in the same study, listing exactly the recalled instances.
        study = orthanc.post("/tools/lookup", a.study_uid.encode())
        study_id = next(item["ID"] for item in study if item["Type"] == "Study")
        instances = orthanc.get(f"/studies/{study_id}/instances")
        notes = [i for i in instances if i["MainDicomTags"]["SOPInstanceUID"] not in a.sop_uids]
        assert len(notes) == 1 and len(instances) == 4
        path = tmp_path / "note-from-orthanc.dcm"
        path.write_bytes(orthanc.get(f"/instances/{notes[0]['ID']}/file"))
        note = pydicom.dcmread(path)
        assert note.SOPClassUID == KOS_STORAGE and note.StudyInstanceUID == a.study_uid
        assert note.ConceptNameCodeSequence[0].CodeValue == "113037"
        assert rejected_uids_of(note) == set(a.sop_uids)
        errors, output = dciodvfy_errors(path)
        assert not errors, output

        # No resend ever sends a recalled output again; the other job's outputs still may go.
        with sessions() as session:
            recalled = deliveries_of(session, a.instance_ids)[0].id
            allowed = deliveries_of(session, kept.instance_ids)[0].id
        assert main(["deliveries", "--config", str(config), "--resend", str(recalled)]) == ExitCode.NOT_FOUND
        assert "recalled" in capsys.readouterr().out
        assert main(["deliveries", "--config", str(config), "--resend", str(allowed)]) == ExitCode.OK
        assert deliver_due(settings, sessions, store) == 1

        # A second run finds everything already recalled: no second note.
        assert main(args) == ExitCode.OK
        assert "already recalled" in capsys.readouterr().out
        assert len(orthanc.get(f"/studies/{study_id}/instances")) == 4

        # Provenance shows the recall from an output and from the note.
        assert main(["provenance", "--config", str(config), a.sop_uids[0]]) == ExitCode.OK
        chain = capsys.readouterr().out
        assert "RECALLED" in chain and "recall 1  reason safety  by qa" in chain and note.SOPInstanceUID in chain
        assert main(["provenance", "--config", str(config), note.SOPInstanceUID]) == ExitCode.OK
        shown = capsys.readouterr().out
        assert "rejection note" in shown and all(uid in shown for uid in a.sop_uids) and "sent" in shown
        engine.dispose()
    finally:
        orthanc.stop()


def test_recall_of_nothing_is_not_found(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(site, 4242)
    assert main(["recall", "--config", str(config), "--series", "1.2.3"]) == ExitCode.NOT_FOUND
    assert "no derived output" in capsys.readouterr().out


def test_migration_0003_recall_goes_down_and_up_again(db_url: str) -> None:
    from alembic import command
    from sqlalchemy import inspect

    from storage.db import alembic_config, current_revision

    engine = make_engine(db_url)
    try:
        upgrade(engine)
        assert "recalls" in inspect(engine).get_table_names()
        config = alembic_config()
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.downgrade(config, "0001")
        assert current_revision(engine) == "0001"
        assert "recalls" not in inspect(engine).get_table_names()
        assert "recall_id" not in {c["name"] for c in inspect(engine).get_columns("outputs")}
        upgrade(engine)
        sessions = session_factory(engine)
        with sessions.begin() as session:
            instance = storage_dbs.add_instance(session, 1, origin="derived")
            (delivery,) = create_deliveries(session, instance.id, [PACS])
            delivery.state = "cancelled"  # the widened check constraint accepts it
    finally:
        engine.dispose()
