"""Deliveries of derived instances to peers, on both databases."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.errors import StorageError
from storage.deliveries import (
    DeliveryTarget,
    create_deliveries,
    due_deliveries,
    get_delivery,
    list_deliveries,
    mark_failed,
    mark_sent,
    resend,
)
from tests import storage_dbs
from tests.storage_dbs import add_instance, at

db_url = storage_dbs.db_url
db_engine = storage_dbs.db_engine
db_sessions = storage_dbs.db_sessions

PACS = DeliveryTarget("pacs", "ORTHANC", "127.0.0.1", 4242)
VIEWER = DeliveryTarget("viewer", "VIEWER", "10.0.0.7", 11112)


def _derived(sessions: sessionmaker[Session]) -> int:
    with sessions.begin() as session:
        return add_instance(session, 50, origin="derived", synthetic=True).id


def test_create_deliveries_is_idempotent_per_instance_and_peer(db_sessions: sessionmaker[Session]) -> None:
    instance_id = _derived(db_sessions)
    with db_sessions.begin() as session:
        first = create_deliveries(session, instance_id, [PACS, VIEWER], now=at(9))
    with db_sessions.begin() as session:
        mark_sent(session, first[0].id, 0x0000, now=at(9, 1))
    with db_sessions.begin() as session:
        again = create_deliveries(session, instance_id, [PACS, VIEWER], now=at(10))
    assert [d.id for d in again] == [d.id for d in first]
    assert [(d.peer_name, d.state) for d in again] == [("pacs", "sent"), ("viewer", "pending")]
    assert (again[1].peer_ae, again[1].peer_host, again[1].peer_port) == ("VIEWER", "10.0.0.7", 11112)
    with db_sessions() as session:
        assert len(list_deliveries(session)) == 2
        assert create_deliveries(session, instance_id, []) == []


def test_due_deliveries_then_sent_with_the_dimse_status(db_sessions: sessionmaker[Session]) -> None:
    instance_id = _derived(db_sessions)
    with db_sessions.begin() as session:
        create_deliveries(session, instance_id, [PACS], now=at(9))
    with db_sessions() as session:
        assert due_deliveries(session, now=at(8, 59)) == []
        [due] = due_deliveries(session, now=at(9))
    with db_sessions.begin() as session:
        sent = mark_sent(session, due.id, 0xB000, now=at(9, 1))  # warning: coercion of data elements
    assert (sent.state, sent.status_code, sent.attempts, sent.sent_at) == ("sent", 0xB000, 1, at(9, 1))
    with db_sessions() as session:
        assert due_deliveries(session, now=at(12)) == []
        with pytest.raises(StorageError, match="is 'sent', not pending"):
            mark_sent(session, due.id, 0)


def test_failed_sends_back_off_then_fail_after_max_attempts(db_sessions: sessionmaker[Session]) -> None:
    instance_id = _derived(db_sessions)
    with db_sessions.begin() as session:
        [delivery] = create_deliveries(session, instance_id, [PACS], now=at(9))
    backoff = timedelta(minutes=2)
    with db_sessions.begin() as session:
        retry = mark_failed(session, delivery.id, "association rejected", backoff, max_attempts=2, now=at(9))
    assert (retry.state, retry.attempts, retry.not_before) == ("pending", 1, at(9, 2))
    with db_sessions() as session:
        assert due_deliveries(session, now=at(9, 1)) == []
        assert [d.id for d in due_deliveries(session, now=at(9, 2))] == [delivery.id]
    with db_sessions.begin() as session:
        final = mark_failed(
            session, delivery.id, "out of resources", backoff, max_attempts=2, status_code=0xA700, now=at(9, 2)
        )
    assert (final.state, final.attempts, final.status_code, final.last_error) == (
        "failed",
        2,
        0xA700,
        "out of resources",
    )
    with db_sessions() as session:
        assert due_deliveries(session, now=at(23)) == []
        assert [d.id for d in list_deliveries(session, state="failed", peer_name="pacs")] == [delivery.id]


def test_resend_makes_a_failed_or_sent_delivery_pending_again(db_sessions: sessionmaker[Session]) -> None:
    instance_id = _derived(db_sessions)
    with db_sessions.begin() as session:
        [delivery] = create_deliveries(session, instance_id, [PACS], now=at(9))
    with db_sessions() as session:
        with pytest.raises(StorageError, match="is 'pending', not failed or sent"):
            resend(session, delivery.id)
    with db_sessions.begin() as session:
        mark_failed(session, delivery.id, "timeout", timedelta(0), max_attempts=1, now=at(9))
    with db_sessions.begin() as session:
        again = resend(session, delivery.id, now=at(15))
    assert (again.state, again.attempts, again.not_before) == ("pending", 0, at(15))
    with db_sessions() as session:
        assert [d.id for d in due_deliveries(session, now=at(15))] == [delivery.id]
        with pytest.raises(StorageError, match="delivery 777 does not exist"):
            get_delivery(session, 777)


def test_delivery_targets_validate_on_construction() -> None:
    with pytest.raises(ValueError, match="AE"):
        DeliveryTarget("pacs", "A" * 17, "127.0.0.1", 104)
    with pytest.raises(ValueError, match="70000"):
        DeliveryTarget("pacs", "PACS", "127.0.0.1", 70000)
