"""The durable instance store, on real files with real DICOM objects."""

from __future__ import annotations

import errno
import hashlib
import os
import re
from datetime import UTC, datetime
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

import storage.store as store_module
from dicomnode.errors import DicomInputError, StorageError
from storage.store import TEMP_PREFIX, InstanceStore, StoredFile
from tests.storage_dbs import dicom_testfile

GENERATED_NAME = re.compile(r"\d{4}/\d{2}/\d{2}/[0-9a-f]{32}\.dcm")


def _cr_bytes() -> bytes:
    """A real computed radiograph (pydicom-data, JPEG 2000), 200 kB."""
    return Path(dicom_testfile("RG3_J2KI.dcm")).read_bytes()


def _files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_write_stores_the_exact_bytes_under_a_generated_name(tmp_path: Path) -> None:
    data = _cr_bytes()
    ds = pydicom.dcmread(dicom_testfile("RG3_J2KI.dcm"), stop_before_pixels=True)
    store = InstanceStore(tmp_path / "store", min_free_bytes=0)

    stored = store.write(data)

    assert GENERATED_NAME.fullmatch(stored.path), stored.path
    assert stored.path.startswith(datetime.now(UTC).strftime("%Y/%m/%d/"))
    for value in (ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID, str(ds.get("PatientID", ""))):
        assert not value or value not in stored.path
    assert stored.sha256 == hashlib.sha256(data).hexdigest()
    assert stored.size_bytes == len(data)
    assert store.absolute(stored.path).read_bytes() == data
    assert store.read(stored.path) == data
    assert _files_under(store.root) == [store.absolute(stored.path)], "a temporary file was left behind"
    assert store.open_dataset(stored.path).SOPInstanceUID == ds.SOPInstanceUID


def test_the_same_bytes_twice_get_two_distinct_files(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path, min_free_bytes=0)
    data = _cr_bytes()
    first, second = store.write(data), store.write(data)
    assert first.path != second.path
    assert first.sha256 == second.sha256
    assert len(_files_under(tmp_path)) == 2


def test_write_dataset_encodes_file_meta_and_reads_back(tmp_path: Path) -> None:
    ds = pydicom.dcmread(dicom_testfile("CT_small.dcm"))
    store = InstanceStore(tmp_path, min_free_bytes=0)

    stored = store.write_dataset(ds)
    also = store.write(ds)

    raw = store.read(stored.path)
    assert raw[128:132] == b"DICM"
    back = store.open_dataset(stored.path)
    assert back.SOPInstanceUID == ds.SOPInstanceUID
    assert back.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
    assert back.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert back.PixelData == ds.PixelData
    assert also.sha256 == stored.sha256 and also.path != stored.path


def test_a_dataset_without_a_transfer_syntax_is_refused(tmp_path: Path) -> None:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.77"
    store = InstanceStore(tmp_path, min_free_bytes=0)
    with pytest.raises(DicomInputError, match="1.2.826.0.1.3680043.8.498.77"):
        store.write_dataset(ds)
    assert _files_under(tmp_path) == []


def test_free_space_watermark_refuses_and_writes_nothing(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path / "store", min_free_bytes=2**62)
    with pytest.raises(StorageError, match="full.*watermark"):
        store.write(_cr_bytes())
    assert _files_under(tmp_path) == []


def test_the_watermark_counts_the_file_being_written(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path, min_free_bytes=0)
    data = _cr_bytes()
    # Exactly enough room for the watermark but not for the file as well.
    store.min_free_bytes = store.free_bytes() - len(data) // 2
    with pytest.raises(StorageError, match="full"):
        store.write(data)
    assert _files_under(tmp_path) == []


def test_bytes_that_are_not_a_part10_file_are_refused(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path, min_free_bytes=0)
    with pytest.raises(DicomInputError, match="DICM"):
        store.write(b"\x00" * 200)
    assert _files_under(tmp_path) == []


def test_a_file_where_the_day_folder_should_be_fails_cleanly(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path, min_free_bytes=0)
    now = datetime.now(UTC)
    (tmp_path / f"{now:%Y}").write_bytes(b"in the way")
    with pytest.raises(StorageError, match="failed"):
        store.write(_cr_bytes())
    assert _files_under(tmp_path) == [tmp_path / f"{now:%Y}"]


@pytest.mark.parametrize(
    ("target", "failing"),
    [(os, "fsync"), (os, "replace"), (store_module, "_fsync_directory")],
    ids=["fsync-temp-file", "rename", "fsync-folder-after-rename"],
)
def test_an_io_error_mid_write_leaves_neither_temporary_nor_final_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target: object, failing: str
) -> None:
    """A disk error cannot be produced for real on a test machine: inject one into the call."""
    store = InstanceStore(tmp_path, min_free_bytes=0)
    data = _cr_bytes()
    earlier = store.write(data)  # the day folders exist: the next write fails at the step named

    def eio(*args: object) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(target, failing, eio)
    with pytest.raises(StorageError, match="Input/output error"):
        store.write(data)
    monkeypatch.undo()
    assert _files_under(tmp_path) == [store.absolute(earlier.path)]


def test_paths_outside_the_store_are_refused(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path / "store", min_free_bytes=0)
    (tmp_path / "secret.dcm").write_bytes(b"x")
    for path in ("../secret.dcm", "/etc/passwd", "", "2025/../../secret.dcm"):
        with pytest.raises(StorageError, match="not a relative path inside the store"):
            store.read(path)
    with pytest.raises(StorageError, match="cannot read"):
        store.read("2025/01/01/missing.dcm")


def test_a_stored_file_that_is_not_dicom_is_a_storage_error(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path, min_free_bytes=0)
    (tmp_path / "junk.dcm").write_bytes(b"not dicom at all")
    with pytest.raises(StorageError, match="junk.dcm"):
        store.open_dataset("junk.dcm")


def test_discard_partial_files_removes_only_leftovers_of_interrupted_writes(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path, min_free_bytes=0)
    kept = store.write(_cr_bytes())
    leftover = store.absolute(kept.path).parent / f"{TEMP_PREFIX}0123"
    leftover.write_bytes(b"half a file")

    assert store.discard_partial_files() == 1

    assert _files_under(tmp_path) == [store.absolute(kept.path)]
    assert store.discard_partial_files() == 0


def test_stored_file_and_store_validate_on_construction(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="relative"):
        StoredFile("/abs.dcm", "0" * 64, 1)
    with pytest.raises(ValueError, match="sha256"):
        StoredFile("a.dcm", "xyz", 1)
    with pytest.raises(ValueError, match="negative"):
        InstanceStore(tmp_path, min_free_bytes=-1)
