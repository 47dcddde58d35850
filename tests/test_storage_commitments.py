"""Storage commitment records (storage.commitments), on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy.orm import Session, sessionmaker

from storage.commitments import create_commitment, expire_commitments, fail_commitment, record_report
from storage.deliveries import DeliveryTarget, create_deliveries, get_delivery
from storage.models import StorageCommitment
from tests import storage_dbs
from tests.storage_dbs import add_instance, at

db_url = storage_dbs.db_url
db_engine = storage_dbs.db_engine
db_sessions = storage_dbs.db_sessions

PACS = DeliveryTarget("pacs", "ORTHANC", "127.0.0.1", 4242)
TX = "1.2.826.0.1.3680043.8.498.77"


def backoff(n: int) -> timedelta:
    return timedelta(minutes=n)


def _committing(sessions: sessionmaker[Session], count: int = 3) -> list[tuple[int, str]]:
    """``count`` deliveries awaiting commitment TX, as (delivery id, SOP Instance UID)."""
    with sessions.begin() as session:
        made = []
        for n in range(count):
            instance = add_instance(session, 60 + n, origin="derived", synthetic=True)
            [delivery] = create_deliveries(session, instance.id, [PACS], now=at(9))
            made.append((delivery.id, instance.sop_instance_uid))
        create_commitment(session, TX, "pacs", [(d, 0) for d, _ in made], timedelta(minutes=5), now=at(9, 1))
    return made


def test_a_report_commits_the_listed_and_retries_the_failed_and_the_missing(
    db_sessions: sessionmaker[Session],
) -> None:
    (ok, ok_uid), (bad, bad_uid), (missing, _) = _committing(db_sessions)
    with db_sessions() as session:
        assert {get_delivery(session, d).state for d in (ok, bad, missing)} == {"committing"}
        assert get_delivery(session, ok).attempts == 1
    with db_sessions.begin() as session:
        counts = record_report(session, TX, [ok_uid], {bad_uid: 0x0112}, backoff, 3, now=at(9, 2))
    assert counts == (1, 2)
    with db_sessions() as session:
        committed = get_delivery(session, ok)
        assert (committed.state, committed.committed_at) == ("committed", at(9, 2))
        for d, text in ((bad, "Failure Reason 0x0112"), (missing, "missing from the report")):
            row = get_delivery(session, d)
            assert (row.state, row.attempts, row.not_before, row.commitment_id) == ("pending", 1, at(9, 3), None)
            assert text in (row.last_error or "")
        request = session.query(StorageCommitment).one()
        assert (request.state, request.n_failed, request.answered_at) == ("failed", 2, at(9, 2))
    # A second report for the same transaction changes nothing; an unknown one is refused.
    with db_sessions.begin() as session:
        assert record_report(session, TX, [ok_uid], {}, backoff, 3, now=at(9, 4)) == (0, 0)
        with pytest.raises(LookupError, match="no storage commitment"):
            record_report(session, "1.2.3.4", [], {}, backoff, 3)


def test_no_report_by_the_deadline_expires_the_request(db_sessions: sessionmaker[Session]) -> None:
    made = _committing(db_sessions, 2)
    with db_sessions.begin() as session:
        assert expire_commitments(session, backoff, 3, now=at(9, 5)) == 0  # deadline is 9:06
    with db_sessions.begin() as session:
        assert expire_commitments(session, backoff, 1, now=at(9, 6)) == 2  # one attempt allowed: failed
    with db_sessions() as session:
        assert {get_delivery(session, d).state for d, _ in made} == {"failed"}
        assert session.query(StorageCommitment).one().state == "expired"


def test_a_failed_request_retries_its_deliveries(db_sessions: sessionmaker[Session]) -> None:
    made = _committing(db_sessions, 2)
    with db_sessions.begin() as session:
        request_id = session.query(StorageCommitment).one().id
        assert fail_commitment(session, request_id, "N-ACTION status 0x0110", backoff, 3, now=at(9, 2)) == 2
    with db_sessions() as session:
        for d, _ in made:
            row = get_delivery(session, d)
            assert (row.state, row.not_before) == ("pending", at(9, 3))
            assert "N-ACTION status 0x0110" in (row.last_error or "")


def test_only_pending_deliveries_can_await_a_commitment(db_sessions: sessionmaker[Session]) -> None:
    [(delivery_id, _)] = _committing(db_sessions, 1)
    with db_sessions.begin() as session, pytest.raises(LookupError, match="not pending"):
        create_commitment(session, TX + ".2", "pacs", [(delivery_id, 0)], timedelta(minutes=5))


def test_migration_0004_dicomweb_upgrades_a_0001_database_with_rows_and_downgrades(db_url: str) -> None:
    from alembic import command
    from sqlalchemy import text

    from storage.db import alembic_config, make_engine, upgrade

    engine = make_engine(db_url)
    try:
        upgrade(engine, "0001")
        with engine.begin() as connection:
            connection.execute(
                text(
                    "INSERT INTO instances (sop_instance_uid, sop_class_uid, study_instance_uid, series_instance_uid,"
                    " synthetic, transfer_syntax_uid, path, sha256, size_bytes, received_at, origin)"
                    " VALUES ('1.2.3', '1.2', '1.2.4', '1.2.5', true, '1.2.840.10008.1.2.1', 'a.dcm', 'ab', 1,"
                    " '2025-01-01 00:00:00', 'derived')"
                )
            )
            connection.execute(
                text(
                    "INSERT INTO deliveries (output_instance_id, peer_name, peer_ae, peer_host, peer_port, state,"
                    " attempts, not_before, created_at) VALUES (1, 'pacs', 'P', 'h', 104, 'sent', 1,"
                    " '2025-01-01 00:00:00', '2025-01-01 00:00:00')"
                )
            )
        upgrade(engine, "0004_dicomweb")
        with engine.begin() as connection:
            connection.execute(text("UPDATE deliveries SET state = 'committed'"))
            assert connection.execute(text("SELECT state, commitment_id FROM deliveries")).one() == ("committed", None)
        config = alembic_config()
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.downgrade(config, "0001")
        with engine.begin() as connection:
            assert connection.execute(text("SELECT state FROM deliveries")).scalar_one() == "sent"
    finally:
        engine.dispose()
