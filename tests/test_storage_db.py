"""Engines, migrations and the schema, on a SQLite file and on PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.errors import ConfigError, StorageError
from storage.db import check_schema, current_revision, head_revision, make_engine, session_factory, upgrade
from storage.models import Base, Instance, Job
from tests import storage_dbs
from tests.storage_dbs import add_instance

db_url = storage_dbs.db_url
db_engine = storage_dbs.db_engine
db_sessions = storage_dbs.db_sessions


def test_upgrade_brings_a_fresh_database_to_head_matching_the_models(db_url: str) -> None:
    eng = make_engine(db_url)
    try:
        assert current_revision(eng) is None
        with pytest.raises(StorageError, match="run `dicomnode db upgrade`"):
            check_schema(eng)

        upgrade(eng)

        assert current_revision(eng) == head_revision() is not None
        check_schema(eng)
        with eng.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
            tables = set(inspect(connection).get_table_names())
        assert {"associations", "instances", "jobs", "outputs", "deliveries", "alembic_version"} <= tables
    finally:
        eng.dispose()


def test_upgrade_is_safe_to_repeat_and_keeps_rows(db_url: str) -> None:
    upgrade(db_url)
    eng = make_engine(db_url)
    try:
        with session_factory(eng).begin() as session:
            add_instance(session, 1)
        upgrade(eng)
        with session_factory(eng)() as session:
            assert session.scalars(select(Instance.sop_instance_uid)).all() == ["1.2.826.0.1.3680043.8.498.1"]
        assert current_revision(eng) == head_revision()
    finally:
        eng.dispose()


def test_sqlite_engine_creates_its_folder_and_sets_wal_foreign_keys_busy_timeout(tmp_path: Path) -> None:
    database = tmp_path / "nested" / "deeper" / "node.sqlite"
    eng = make_engine(f"sqlite:///{database}")
    try:
        with eng.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30_000
            assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        assert database.exists()
    finally:
        eng.dispose()


def test_invalid_database_urls_are_configuration_errors() -> None:
    with pytest.raises(ConfigError, match="not-a-url"):
        make_engine("not-a-url")
    with pytest.raises(ConfigError, match="nosuchdb"):
        make_engine("nosuchdb://host/db")


def test_datetimes_come_back_aware_utc_whatever_zone_went_in(db_sessions: sessionmaker[Session]) -> None:
    received = datetime(2025, 3, 14, 10, 30, 15, 123456, tzinfo=timezone(timedelta(hours=2)))
    with db_sessions.begin() as session:
        add_instance(session, 7, received_at=received)
    with db_sessions() as session:
        stored = session.scalars(select(Instance.received_at)).one()
    assert stored.tzinfo is not None and stored.utcoffset() == timedelta(0)
    assert stored == received
    assert stored == datetime(2025, 3, 14, 8, 30, 15, 123456, tzinfo=UTC)


def test_naive_datetimes_are_refused(db_sessions: sessionmaker[Session]) -> None:
    with db_sessions() as session:
        with pytest.raises(StorageError, match="naive datetime"):
            add_instance(session, 8, received_at=datetime(2025, 3, 14, 10, 0))


def test_foreign_keys_are_enforced(db_sessions: sessionmaker[Session]) -> None:
    with db_sessions() as session:
        session.add(
            Job(
                input_instance_id=4242,
                rule_name="r",
                azimuths=[90.0],
                elevations=[0.0],
                destinations=[],
                request_key="k",
            )
        )
        with pytest.raises(IntegrityError):
            session.flush()


def test_unrecorded_state_values_are_refused_before_the_database(db_engine: Engine) -> None:
    with pytest.raises(ValueError, match="'finished' is not one of"):
        Job(state="finished")
    with pytest.raises(ValueError, match="'copied'"):
        Instance(origin="copied")


def test_postgresql_url_as_documented_gets_an_installed_driver() -> None:
    """README and the shipped config write ``postgresql://``; SQLAlchemy 2.1 maps that to psycopg 3,
    which need not be installed. The engine must still work with the URL as written."""
    import importlib.util

    from sqlalchemy.engine import make_url

    from storage.db import with_installed_driver

    url = with_installed_driver(make_url("postgresql://u:p@db:5432/node"))
    driver = url.get_dialect().driver
    assert importlib.util.find_spec(driver) is not None, f"{driver} is not installed"
    assert url.render_as_string(hide_password=False).endswith("u:p@db:5432/node")
    named = make_url("postgresql+psycopg2://u@db/node")
    assert with_installed_driver(named) is named
    assert with_installed_driver(make_url("sqlite:///x.db")).drivername == "sqlite"
    engine = make_engine("postgresql://u@db/node")  # no connection is made here
    assert importlib.util.find_spec(engine.dialect.driver) is not None
    engine.dispose()
