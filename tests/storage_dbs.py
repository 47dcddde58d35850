"""Database fixtures for the storage tests: every test runs on a SQLite file and on PostgreSQL.

PostgreSQL isolation: each test gets a schema of its own, ``storage_test_<random>``, made the
connection's ``search_path`` through the URL (``?options=-csearch_path=...``), so tables, the
Alembic version table and indexes all land there; the schema is dropped (CASCADE) afterwards.
Other helpers using the same ``test`` database never see these tables.

The server is ``DICOMNODE_TEST_POSTGRES_URL`` (default: postgres@127.0.0.1:5432/test). When it
cannot be reached the PostgreSQL variants are skipped with that reason (``pytest -ra`` lists it).
A test module takes the fixtures by binding them at module level (``db_sessions =
storage_dbs.db_sessions``), which keeps them local to the storage tests; the helper functions
(``add_instance``, ``at``, ``dicom_testfile``) are imported as usual.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from storage.db import make_engine, session_factory, upgrade
from storage.instances import record_instance
from storage.models import Instance

# Spelled as a user writes it (README, config/dicomnode.toml): no driver named.
POSTGRES_URL = os.environ.get("DICOMNODE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL to an empty database: a SQLite file, or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'db' / 'node.sqlite'}"
        return
    schema = f"storage_test_{uuid.uuid4().hex[:16]}"
    base = make_engine(POSTGRES_URL)  # the same URL handling as the node's
    admin = base.execution_options(isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    except OperationalError as e:
        base.dispose()
        pytest.skip(f"PostgreSQL at {POSTGRES_URL} is not reachable: {e.orig}")
    try:
        yield f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        base.dispose()


@pytest.fixture
def db_engine(db_url: str) -> Iterator[Engine]:
    """An engine on a database migrated to head."""
    eng = make_engine(db_url)
    upgrade(eng)
    yield eng
    eng.dispose()


@pytest.fixture
def db_sessions(db_engine: Engine) -> sessionmaker[Session]:
    return session_factory(db_engine)


def dicom_testfile(name: str) -> str:
    """The path of a DICOM file shipped by pydicom or pydicom-data (never downloaded)."""
    path = get_testdata_file(name, download=False)
    assert isinstance(path, str), f"{name} is not installed (pip install pydicom-data)"
    return path


def at(hour: int, minute: int = 0) -> datetime:
    """A fixed aware UTC time on a fixed day, for tests that reason about not_before."""
    return datetime(2025, 3, 14, hour, minute, tzinfo=UTC)


def add_instance(session: Session, n: int, **overrides: object) -> Instance:
    """Record a plausible instance; ``n`` makes its UIDs and path unique."""
    fields: dict[str, object] = {
        "sop_instance_uid": f"1.2.826.0.1.3680043.8.498.{n}",
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.1",
        "study_instance_uid": "1.2.826.0.1.3680043.8.498.1000",
        "series_instance_uid": "1.2.826.0.1.3680043.8.498.2000",
        "modality": "CR",
        "transfer_syntax_uid": "1.2.840.10008.1.2.1",
        "path": f"2025/03/14/{n:032x}.dcm",
        "sha256": f"{n:064x}",
        "size_bytes": 1000 + n,
        "received_at": at(8),
    }
    fields.update(overrides)
    return record_instance(session, **fields)
