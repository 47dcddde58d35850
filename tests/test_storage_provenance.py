"""The provenance chain from an input UID and from an output UID, on both databases."""

from __future__ import annotations

import dataclasses

import pytest
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.errors import StorageError
from storage.associations import end_association, record_association
from storage.deliveries import DeliveryTarget, create_deliveries, mark_sent
from storage.jobs import enqueue_job
from storage.outputs import outputs_of_job, record_output
from storage.provenance import ProvenanceChain, provenance_chain
from tests import storage_dbs
from tests.storage_dbs import add_instance, at

db_url = storage_dbs.db_url
db_engine = storage_dbs.db_engine
db_sessions = storage_dbs.db_sessions

INPUT_UID = "1.2.826.0.1.3680043.8.498.1"
LATERAL_UID = "1.2.826.0.1.3680043.8.498.101"
OBLIQUE_UID = "1.2.826.0.1.3680043.8.498.102"


def _output(session: Session, job_id: int, n: int, azimuth: float) -> int:
    derived = add_instance(
        session,
        n,
        origin="derived",
        synthetic=True,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.7",
        series_instance_uid="1.2.826.0.1.3680043.8.498.900",
        modality="OT",
        received_at=at(9, 3),
    )
    record_output(
        session,
        job_id=job_id,
        instance_id=derived.id,
        azimuth=azimuth,
        elevation=0.0,
        seed=1234,
        model_name="svdrr-512",
        model_identity="sha256:" + "ab" * 32,
        model_version="1.0",
        steps=50,
        guidance_scale=3.0,
        sampler="ddim",
        device="cpu",
        dtype="float32",
        series_instance_uid="1.2.826.0.1.3680043.8.498.900",
        created_at=at(9, 3),
        synthesis_s=41.5,
        total_s=44.0,
    )
    return derived.id


def _build_chain(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        assoc = record_association(
            session,
            calling_ae="MODALITY",
            called_ae="SVDRR",
            peer_host="127.0.0.1",
            peer_port=40100,
            accepted=True,
            started_at=at(8),
        )
        source = add_instance(session, 1, association_id=assoc.id, calling_ae="MODALITY", called_ae="SVDRR")
        end_association(session, assoc.id, n_instances=1, ended_at=at(8, 1))
        add_instance(session, 2)  # an unrelated instance of the same study
        views, _ = (
            enqueue_job(
                session,
                input_instance_id=source.id,
                rule_name=rule_name,
                azimuths=azimuths,
                elevations=[0.0],
                destinations=["pacs"],
                request_key=rule_name,
                now=at(8, 2),
            )
            for rule_name, azimuths in (("chest-views", [90.0, 45.0]), ("chest-other", [180.0]))
        )
        lateral = _output(session, views.id, 101, 90.0)
        _output(session, views.id, 102, 45.0)
        [delivery] = create_deliveries(session, lateral, [DeliveryTarget("pacs", "ORTHANC", "127.0.0.1", 4242)])
        mark_sent(session, delivery.id, 0x0000, now=at(9, 4))


def _assert_full_chain(chain: ProvenanceChain) -> None:
    assert chain.association is not None
    assert (chain.association.calling_ae, chain.association.peer_port) == ("MODALITY", 40100)
    assert chain.association.ended_at == at(8, 1)
    assert chain.input.sop_instance_uid == INPUT_UID and chain.input.origin == "received"
    assert [(j.rule_name, j.azimuths) for j in chain.jobs] == [("chest-views", (90.0, 45.0)), ("chest-other", (180.0,))]
    views, other = chain.jobs
    assert other.outputs == ()
    assert [o.instance.sop_instance_uid for o in views.outputs] == [LATERAL_UID, OBLIQUE_UID]
    lateral, oblique = views.outputs
    assert lateral.instance.synthetic and lateral.instance.sop_class_uid == "1.2.840.10008.5.1.4.1.1.7"
    assert (lateral.model_name, lateral.seed, lateral.steps, lateral.synthesis_s) == ("svdrr-512", 1234, 50, 41.5)
    assert [(d.peer_name, d.state, d.status_code, d.sent_at) for d in lateral.deliveries] == [
        ("pacs", "sent", 0, at(9, 4))
    ]
    assert oblique.deliveries == ()


def test_chain_from_the_input_uid(db_sessions: sessionmaker[Session]) -> None:
    _build_chain(db_sessions)
    with db_sessions() as session:
        chain = provenance_chain(session, INPUT_UID)
    assert chain is not None
    assert (chain.queried_uid, chain.role) == (INPUT_UID, "input")
    _assert_full_chain(chain)


def test_chain_from_an_output_uid_is_found_through_its_output_row(db_sessions: sessionmaker[Session]) -> None:
    _build_chain(db_sessions)
    with db_sessions() as session:
        chain = provenance_chain(session, OBLIQUE_UID)
        from_input = provenance_chain(session, INPUT_UID)
    assert chain is not None and from_input is not None
    assert (chain.queried_uid, chain.role) == (OBLIQUE_UID, "output")
    _assert_full_chain(chain)
    assert dataclasses.replace(chain, queried_uid=INPUT_UID, role="input") == from_input


def test_chain_of_an_instance_without_jobs_and_of_an_unknown_uid(db_sessions: sessionmaker[Session]) -> None:
    _build_chain(db_sessions)
    with db_sessions() as session:
        lonely = provenance_chain(session, "1.2.826.0.1.3680043.8.498.2")
        assert provenance_chain(session, "9.9.9") is None
    assert lonely is not None
    assert (lonely.role, lonely.association, lonely.jobs) == ("input", None, ())


def test_outputs_are_listed_per_job_and_an_instance_has_one_output(db_sessions: sessionmaker[Session]) -> None:
    _build_chain(db_sessions)
    with db_sessions() as session:
        chain = provenance_chain(session, INPUT_UID)
        assert chain is not None
        views = chain.jobs[0]
        assert [o.azimuth for o in outputs_of_job(session, views.id)] == [90.0, 45.0]
        with pytest.raises(StorageError, match="cannot record output of job"):
            record_output(
                session,
                job_id=views.id,
                instance_id=views.outputs[0].instance.id,
                azimuth=90.0,
                elevation=0.0,
                seed=1,
                model_name="m",
                model_identity="x",
                steps=1,
                guidance_scale=1.0,
                series_instance_uid="1.2.3",
            )
