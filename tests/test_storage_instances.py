"""Recording instances and associations, and the duplicate-policy primitive, on both databases."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pydicom
import pytest
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.errors import DicomInputError, StorageError
from storage.associations import end_association, record_association
from storage.instances import (
    classify_resend,
    fields_from_dataset,
    find_instance,
    insert_received,
    list_instances,
    record_instance,
)
from storage.models import Instance
from storage.store import InstanceStore
from tests import storage_dbs
from tests.storage_dbs import add_instance, at, dicom_testfile

db_url = storage_dbs.db_url
db_engine = storage_dbs.db_engine
db_sessions = storage_dbs.db_sessions


def test_a_received_cr_is_stored_recorded_and_found(db_sessions: sessionmaker[Session], tmp_path: Path) -> None:
    """The C-STORE path without the network: bytes on disk, row with the sender, commit, find."""
    data = Path(dicom_testfile("RG3_J2KI.dcm")).read_bytes()
    ds = pydicom.dcmread(dicom_testfile("RG3_J2KI.dcm"), stop_before_pixels=True)
    stored = InstanceStore(tmp_path / "store", min_free_bytes=0).write(data)
    with db_sessions.begin() as session:
        assoc = record_association(
            session, calling_ae="MODALITY", called_ae="SVDRR", peer_host="127.0.0.1", peer_port=40001, accepted=True
        )
        record_instance(
            session,
            **fields_from_dataset(ds),
            path=stored.path,
            sha256=stored.sha256,
            size_bytes=stored.size_bytes,
            association_id=assoc.id,
            origin="received",
            calling_ae="MODALITY",
            called_ae="SVDRR",
            peer_host="127.0.0.1",
        )
        end_association(session, assoc.id, n_instances=1)

    with db_sessions() as session:
        found = find_instance(session, ds.SOPInstanceUID)
        assert found is not None
        assert found.sop_class_uid == "1.2.840.10008.5.1.4.1.1.1"  # CR Image Storage
        assert found.modality == "CR"
        assert found.body_part_examined == "EXTREMITY"
        assert found.view_position == "AP"
        assert found.image_type == "DERIVED\\PRIMARY"
        assert found.transfer_syntax_uid == "1.2.840.10008.1.2.4.91"
        assert found.synthetic is False
        assert found.sha256 == hashlib.sha256(data).hexdigest()
        assert found.association is not None and found.association.calling_ae == "MODALITY"
        assert found.association.n_instances == 1 and found.association.ended_at is not None
        assert find_instance(session, "1.2.3.4.5.6.7") is None


def test_fields_from_dataset_reads_synthetic_data_and_requires_uids() -> None:
    ds = pydicom.dcmread(dicom_testfile("CT_small.dcm"))
    ds.SyntheticData = "YES"
    fields = fields_from_dataset(ds)
    assert fields["synthetic"] is True
    assert fields["sop_instance_uid"] == ds.SOPInstanceUID
    with pytest.warns(UserWarning, match="exceeds the maximum length"):  # pydicom lets it in, warning
        ds.ViewPosition = "A" * 17
    with pytest.raises(DicomInputError, match="ViewPosition 'AAAAAAAAAAAAAAAAA' is longer than 16"):
        fields_from_dataset(ds)
    del ds.ViewPosition
    del ds.StudyInstanceUID
    with pytest.raises(DicomInputError, match="StudyInstanceUID"):
        fields_from_dataset(ds)


def test_a_second_row_with_the_same_sop_instance_uid_is_a_storage_error(
    db_sessions: sessionmaker[Session],
) -> None:
    with db_sessions.begin() as session:
        add_instance(session, 1)
    with db_sessions() as session:
        with pytest.raises(StorageError, match=r"1\.2\.826\.0\.1\.3680043\.8\.498\.1'"):
            add_instance(session, 1, path="2025/03/14/other.dcm")
        session.rollback()
        assert len(list_instances(session)) == 1


def test_classify_resend_compares_content_hashes(db_sessions: sessionmaker[Session]) -> None:
    with db_sessions.begin() as session:
        existing = add_instance(session, 3)
    assert classify_resend(existing, existing.sha256) == "identical"
    assert classify_resend(existing, existing.sha256.upper()) == "identical"
    assert classify_resend(existing, hashlib.sha256(b"other pixels").hexdigest()) == "conflict"


def test_list_instances_filters_by_study_and_origin(db_sessions: sessionmaker[Session]) -> None:
    with db_sessions.begin() as session:
        add_instance(session, 1, received_at=at(8))
        add_instance(session, 2, received_at=at(9), origin="derived", synthetic=True)
        add_instance(session, 3, received_at=at(10), study_instance_uid="1.2.826.0.1.3680043.8.498.9999")
    with db_sessions() as session:
        assert [i.id for i in list_instances(session)] == [3, 2, 1]
        assert [i.id for i in list_instances(session, origin="derived")] == [2]
        assert [i.id for i in list_instances(session, study_instance_uid="1.2.826.0.1.3680043.8.498.9999")] == [3]


def test_insert_received_writes_the_row_record_instance_writes(db_sessions: sessionmaker[Session]) -> None:
    """The SCP's one-statement insert: the same columns and defaults as the ORM row, same errors."""
    ds = pydicom.dcmread(dicom_testfile("RG3_J2KI.dcm"), stop_before_pixels=True)
    common = {"sha256": "0" * 64, "size_bytes": 10, "origin": "received", "calling_ae": "MODALITY",
              "called_ae": "SVDRR", "peer_host": "127.0.0.1"}  # fmt: skip
    fields = fields_from_dataset(ds)
    with db_sessions.begin() as session:
        fast = insert_received(session, **fields, **common, path="a/fast.dcm")
        assert fast.id is not None and fast.sop_instance_uid == ds.SOPInstanceUID
    with db_sessions.begin() as session:
        orm = record_instance(session, **{**fields, "sop_instance_uid": "1.2.3.4.5.99"}, **common, path="a/orm.dcm")
        orm_id = orm.id
    with db_sessions() as session:
        one, other = session.get(Instance, fast.id), session.get(Instance, orm_id)
        assert one is not None and other is not None
        skip = {"id", "sop_instance_uid", "path", "received_at"}
        columns = [c.key for c in Instance.__table__.columns if c.key not in skip]
        assert {c: getattr(one, c) for c in columns} == {c: getattr(other, c) for c in columns}
        assert one.received_at is not None and abs((other.received_at - one.received_at).total_seconds()) < 60
        assert one.synthetic is False and one.origin == "received"
    with pytest.raises(StorageError, match="cannot record instance"), db_sessions.begin() as session:
        insert_received(session, **fields, **common, path="a/again.dcm")  # the same SOP Instance UID
