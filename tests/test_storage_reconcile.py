"""Start-up reconciliation (storage/reconcile.py) and a store shared by nodes at different mount
paths, on a SQLite file and on PostgreSQL."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pydicom
import pytest
from sqlalchemy.orm import Session, sessionmaker

from storage.instances import fields_from_dataset, record_instance
from storage.models import Instance
from storage.reconcile import (
    QUARANTINE,
    quarantine_unrecorded,
    quarantined_files,
    rows_without_their_file,
    store_files,
)
from storage.store import TEMP_PREFIX, InstanceStore
from tests import storage_dbs
from tests.storage_dbs import dicom_testfile

db_url = storage_dbs.db_url
db_engine = storage_dbs.db_engine
db_sessions = storage_dbs.db_sessions


def _dataset(uid: str) -> pydicom.Dataset:
    ds = pydicom.dcmread(dicom_testfile("CT_small.dcm"))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
    return ds


def _age(store: InstanceStore, path: str, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(store.absolute(path), (then, then))


def test_unrecorded_old_files_go_to_quarantine_and_recorded_ones_stay(
    tmp_path: Path, db_sessions: sessionmaker[Session]
) -> None:
    store = InstanceStore(tmp_path / "store", 0)
    recorded = store.write_dataset(_dataset("1.2.826.0.1.3680043.8.498.1"))
    with db_sessions.begin() as session:
        fields = fields_from_dataset(_dataset("1.2.826.0.1.3680043.8.498.1"))
        fields.update(path=recorded.path, sha256=recorded.sha256, size_bytes=recorded.size_bytes)
        record_instance(session, origin="received", **fields)
    crashed = store.write_dataset(_dataset("1.2.826.0.1.3680043.8.498.2"))  # renamed, never committed
    young = store.write_dataset(_dataset("1.2.826.0.1.3680043.8.498.3"))  # perhaps another node's, mid-commit
    for path in (recorded.path, crashed.path):
        _age(store, path, 3600)
    partial = store.absolute(young.path).parent / f"{TEMP_PREFIX}abc"
    partial.write_bytes(b"half")
    assert store_files(store) == sorted([recorded.path, crashed.path, young.path])

    moved = quarantine_unrecorded(store, db_sessions, min_age_s=600)

    assert [m.path for m in moved] == [crashed.path]
    assert quarantined_files(store) == [f"{QUARANTINE}/{crashed.path}"]
    assert not store.absolute(crashed.path).exists()
    quarantined = pydicom.dcmread(store.root / QUARANTINE / crashed.path)
    assert quarantined.SOPInstanceUID == "1.2.826.0.1.3680043.8.498.2", "moved whole, not deleted"
    assert store.absolute(recorded.path).read_bytes() == store.read(recorded.path)
    assert store.absolute(young.path).exists() and partial.exists()
    assert store_files(store) == sorted([recorded.path, young.path]), "quarantine is not part of the store"
    assert [m.path for m in quarantine_unrecorded(store, db_sessions, min_age_s=0)] == [young.path]
    assert quarantine_unrecorded(store, db_sessions, min_age_s=0) == []


def test_nodes_mounting_one_store_at_different_paths_read_each_others_instances(
    tmp_path: Path, db_sessions: sessionmaker[Session]
) -> None:
    """Stored paths are relative to the store root, so every node may mount it where it likes."""
    (tmp_path / "nfs").mkdir()
    (tmp_path / "edge").mkdir()
    (tmp_path / "gpu").mkdir()
    os.symlink(tmp_path / "nfs", tmp_path / "edge" / "mnt")
    os.symlink(tmp_path / "nfs", tmp_path / "gpu" / "data")
    edge = InstanceStore(tmp_path / "edge" / "mnt", 0)
    worker = InstanceStore(tmp_path / "gpu" / "data", 0)
    ds = _dataset("1.2.826.0.1.3680043.8.498.9")
    stored = edge.write_dataset(ds)
    with db_sessions.begin() as session:
        fields = fields_from_dataset(ds)
        fields.update(path=stored.path, sha256=stored.sha256, size_bytes=stored.size_bytes)
        row = record_instance(session, origin="received", **fields)
        assert not Path(row.path).is_absolute() and str(tmp_path) not in row.path
        path = row.path
    assert worker.open_dataset(path).SOPInstanceUID == ds.SOPInstanceUID


def test_recent_rows_whose_file_a_crash_left_missing_or_short_are_named_and_left_alone(
    tmp_path: Path, db_sessions: sessionmaker[Session], caplog: pytest.LogCaptureFixture
) -> None:
    store = InstanceStore(tmp_path / "store", 0)
    rows = {}
    for n in (1, 2, 3):
        uid = f"1.2.826.0.1.3680043.8.498.{n}"
        stored = store.write_dataset(_dataset(uid))
        with db_sessions.begin() as session:
            fields = fields_from_dataset(_dataset(uid))
            fields.update(path=stored.path, sha256=stored.sha256, size_bytes=stored.size_bytes)
            rows[n] = record_instance(session, origin="received", **fields).id
    # The row reached the disk, the file did not (2) or only in part (3): a crash before the flush.
    with db_sessions() as session:
        by_id = {row_id: session.get(Instance, row_id) for row_id in rows.values()}
    store.absolute(by_id[rows[2]].path).unlink()
    third = store.absolute(by_id[rows[3]].path)
    third.write_bytes(third.read_bytes()[:100])
    caplog.set_level(logging.ERROR, logger="storage.reconcile")

    broken = rows_without_their_file(store, db_sessions)

    assert sorted(row.id for row in broken) == [rows[2], rows[3]]
    assert "1.2.826.0.1.3680043.8.498.2" in caplog.text and "1.2.826.0.1.3680043.8.498.3" in caplog.text
    assert store.absolute(by_id[rows[1]].path).exists() and third.exists()  # nothing changed
    assert [row.id for row in rows_without_their_file(store, db_sessions, recent=1)] == [rows[3]]
