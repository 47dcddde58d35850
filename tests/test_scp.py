"""The Storage SCP against real peers on loopback: dcmtk echoscu/storescu and raw pynetdicom requests.

Every stored instance is read back from disk and compared with its row; every refusal is checked
for its status, its log line and its database row, and for leaving nothing behind.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid
from pynetdicom import AE
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import ComputedRadiographyImageStorage, CTImageStorage  # type: ignore[attr-defined]
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from dicomnode.dataset_checks import (
    CANNOT_UNDERSTAND,
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
    INVALID_UID,
    OUT_OF_RESOURCES,
    check_complete,
)
from dicomnode.errors import DicomInputError
from dicomnode.rules import InstanceFacts
from dicomnode.scp import DUPLICATE_SOP_INSTANCE
from dicomnode.scu import send
from storage.instances import ReceivedRow
from storage.models import Instance
from tests.dicom_nodes import AE_TITLE, CALLING, Node, body_of, dcmtk_run, pydicom_file, wait_until
from tests.raw_dicom import raw_store

# Real files shipped by pydicom-data, with the storescu option that proposes their own transfer syntax:
# storescu proposes uncompressed syntaxes only unless told (-xv JPEG 2000 lossless, -xs JPEG lossless,
# -xt JPEG-LS lossless, -xr RLE), and converts a file when it can.
FILES = {
    "RG1_UNCR.dcm": (),  # CR, Explicit VR Little Endian
    "RG1_J2KR.dcm": ("-xv",),  # CR, JPEG 2000 lossless
    "JPEG-LL.dcm": ("-xs",),  # SC, JPEG lossless SV1
    "MR_small_jpeg_ls_lossless.dcm": ("-xt",),  # MR, JPEG-LS lossless
    "emri_small_RLE.dcm": ("-xr",),  # Enhanced MR, RLE lossless
    "image_dfl.dcm": ("-xd",),  # OT, Deflated Explicit VR Little Endian
    "CT_small.dcm": (),  # CT, Explicit VR Little Endian: not a radiograph
}


def storescu(node: Node, *files: Path, options: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """dcmtk storescu proposing only the classes of ``files`` (-R), over one association."""
    return dcmtk_run(
        "storescu",
        "-R",
        *options,
        "-aet",
        CALLING,
        "-aec",
        AE_TITLE,
        "127.0.0.1",
        str(node.port),
        *map(str, files),
    )


@contextmanager
def raw_association(node: Node, sop_class: str) -> Iterator[Callable[[str, bytes], Dataset]]:
    """An association on which the test sends hand-made C-STORE requests with arbitrary bytes."""
    with raw_store(node.port, sop_class) as store:

        def as_status(sop_instance_uid: str, body: bytes) -> Dataset:
            code, comment = store(sop_instance_uid, body)
            status = Dataset()
            status.Status = code
            if comment:
                status.ErrorComment = comment
            return status

        yield as_status


def same_content(stored: Dataset, original: Dataset) -> bool:
    """Equal elements, compressed Pixel Data fragments included; dcmtk drops group lengths and padding."""

    def kept(ds: Dataset) -> dict[int, object]:
        return {e.tag: e.value for e in ds if e.tag.element != 0 and e.keyword != "DataSetTrailingPadding"}

    return kept(stored) == kept(original)


# ---- Verification and association policy ----------------------------------------------------------


def test_echoscu_succeeds_and_the_association_is_recorded(node: Node) -> None:
    result = dcmtk_run("echoscu", "-aet", CALLING, "-aec", AE_TITLE, "127.0.0.1", str(node.port))
    assert result.returncode == 0, result.stderr
    wait_until(lambda: any(a.ended_at for a in node.associations()))
    (row,) = node.associations()
    assert (row.accepted, row.calling_ae, row.called_ae, row.peer_host) == (
        True,
        CALLING,
        AE_TITLE,
        "127.0.0.1",
    )
    assert (
        row.peer_port > 0
        and row.n_instances == 0
        and row.ended_at is not None
        and row.ended_at >= row.started_at
    )


def test_unknown_calling_ae_is_rejected_logged_and_recorded(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="dicomnode.scp")
    result = dcmtk_run("echoscu", "-aet", "INTRUDER", "-aec", AE_TITLE, "127.0.0.1", str(node.port))
    assert result.returncode != 0
    wait_until(lambda: "rejected from" in caplog.text)  # logged once the row is committed
    (row,) = node.associations()
    assert row.accepted is False and row.calling_ae == "INTRUDER"
    assert row.reason == "calling AE 'INTRUDER' not in allowed list"
    assert f"association {row.id}: rejected from 127.0.0.1" in caplog.text
    assert "calling AE 'INTRUDER' not in allowed list" in caplog.text


def test_wrong_called_ae_is_rejected(node: Node, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="dicomnode.scp")
    result = dcmtk_run("echoscu", "-aet", CALLING, "-aec", "SOMEONEELSE", "127.0.0.1", str(node.port))
    assert result.returncode != 0
    wait_until(lambda: "rejected from" in caplog.text)  # logged once the row is committed
    (row,) = node.associations()
    assert row.accepted is False and row.reason == "called AE 'SOMEONEELSE' is not 'SVDRR'"
    assert "called AE 'SOMEONEELSE' is not 'SVDRR'" in caplog.text


# ---- Storing real files -----------------------------------------------------------------------------


def test_storescu_of_real_files_stores_each_durably_and_records_it(node: Node) -> None:
    paths = [pydicom_file(name) for name in FILES]
    for path, options in zip(paths, FILES.values(), strict=True):
        result = storescu(node, path, options=options)
        assert result.returncode == 0, result.stderr
    wait_until(lambda: all(a.ended_at for a in node.associations()))
    rows = {row.sop_instance_uid: row for row in node.instances()}
    assert len(rows) == len(paths)
    associations = {a.id: a for a in node.associations()}
    assert len(associations) == len(paths)
    assert all(a.accepted and a.n_instances == 1 for a in associations.values())
    for path in paths:
        original = pydicom.dcmread(path, stop_before_pixels=True)
        row = rows[original.SOPInstanceUID]
        stored = node.store.absolute(row.path)
        data = stored.read_bytes()
        assert hashlib.sha256(data).hexdigest() == row.sha256 and len(data) == row.size_bytes
        assert original.SOPInstanceUID not in str(row.path)
        back = pydicom.dcmread(stored, stop_before_pixels=True)
        assert back.SOPInstanceUID == original.SOPInstanceUID
        assert (
            back.file_meta.TransferSyntaxUID
            == original.file_meta.TransferSyntaxUID
            == row.transfer_syntax_uid
        )
        assert same_content(pydicom.dcmread(stored), pydicom.dcmread(path))
        assert row.association_id in associations
        assert (row.origin, row.calling_ae, row.called_ae, row.peer_host) == (
            "received",
            CALLING,
            AE_TITLE,
            "127.0.0.1",
        )
        assert row.sop_class_uid == original.SOPClassUID and row.modality == original.get("Modality")
    assert len(node.files()) == len(paths)


def test_identical_resend_succeeds_and_keeps_one_row(node: Node, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dicomnode.scp")
    path = pydicom_file("CT_small.dcm")
    assert storescu(node, path).returncode == 0
    assert storescu(node, path).returncode == 0
    assert len(node.instances()) == 1 and len(node.files()) == 1
    assert "re-sent with identical content" in caplog.text


def test_other_content_under_a_stored_uid_is_refused_and_the_original_kept(
    node: Node, tmp_path: Path
) -> None:
    path = pydicom_file("CT_small.dcm")
    assert storescu(node, path).returncode == 0
    (row,) = node.instances()
    before = node.store.absolute(row.path).read_bytes()
    changed = pydicom.dcmread(path)
    changed.SeriesDescription = "changed"
    changed_path = tmp_path / "changed.dcm"
    changed.save_as(changed_path)
    (result,) = send(node.peer(), CALLING, [changed_path])
    assert result.status == DUPLICATE_SOP_INSTANCE
    assert result.error is not None and "already stored with other content" in result.error
    assert node.store.absolute(row.path).read_bytes() == before
    assert len(node.instances()) == 1 and len(node.files()) == 1


def test_within_one_context_the_requestors_preferred_transfer_syntax_is_accepted(node: Node) -> None:
    # +C: one context per class proposing JPEG 2000 lossless first, then the uncompressed syntaxes.
    path = pydicom_file("RG1_J2KR.dcm")
    result = storescu(node, path, options=("-xv", "+C"))
    assert result.returncode == 0, result.stderr
    (row,) = node.instances()
    assert row.transfer_syntax_uid == JPEG2000Lossless
    assert same_content(pydicom.dcmread(node.store.absolute(row.path)), pydicom.dcmread(path))


# ---- Refusals ---------------------------------------------------------------------------------------


def test_truncated_bad_and_mismatched_data_sets_are_refused_and_the_node_keeps_serving(node: Node) -> None:
    ct = pydicom_file("CT_small.dcm")
    ds = pydicom.dcmread(ct)
    body = body_of(ct)
    no_instance_uid = pydicom.dcmread(ct)
    del no_instance_uid.SOPInstanceUID
    with raw_association(node, CTImageStorage) as store:
        cut_in_pixels = store(ds.SOPInstanceUID, body[:-1000])
        cut_in_header = store(ds.SOPInstanceUID, body[: body.index(ds.SOPInstanceUID.encode()) + 5])
        garbage = store(ds.SOPInstanceUID, b"\x08\x00\x18\x00UI\xff\x7f" + b"1" * 20)
        missing = store(generate_uid(), encode(no_instance_uid, False, True) or b"")
    for status in (cut_in_pixels, cut_in_header, garbage):
        assert status.Status == CANNOT_UNDERSTAND and "truncated" in status.ErrorComment
    assert missing.Status == INVALID_UID and "SOPInstanceUID missing" in missing.ErrorComment
    with raw_association(node, ComputedRadiographyImageStorage) as store:
        mismatch = store(ds.SOPInstanceUID, body)
    assert mismatch.Status == DATA_SET_DOES_NOT_MATCH_SOP_CLASS and ds.SOPClassUID in mismatch.ErrorComment
    assert node.instances() == [] and node.files() == []
    assert storescu(node, ct).returncode == 0
    assert [row.sop_instance_uid for row in node.instances()] == [ds.SOPInstanceUID]


def test_the_received_bytes_are_stored_unchanged(node: Node) -> None:
    ct = pydicom_file("CT_small.dcm")
    body = body_of(ct)
    with raw_association(node, CTImageStorage) as store:
        assert store(pydicom.dcmread(ct).SOPInstanceUID, body).Status == 0x0000
    (row,) = node.instances()
    assert body_of(node.store.absolute(row.path)) == body


def test_below_the_free_space_watermark_nothing_is_stored(start_node: Callable[..., Node]) -> None:
    node = start_node(min_free_bytes=2**62)
    (result,) = send(node.peer(), CALLING, [pydicom_file("CT_small.dcm")])
    assert result.status == OUT_OF_RESOURCES and result.error is not None
    assert node.instances() == [] and list(node.store.root.rglob("*")) == []


# ---- Intake -----------------------------------------------------------------------------------------


def test_intake_runs_once_per_new_instance_inside_the_transaction(start_node: Callable[..., Node]) -> None:
    seen: list[tuple[str, bool, int | None]] = []
    holder: list[Node] = []

    def intake(session: Session, instance: ReceivedRow, facts: InstanceFacts) -> None:
        with holder[0].sessions() as other:  # a second connection must not see the row yet
            committed = other.scalar(select(func.count()).select_from(Instance))
        assert facts.sop_class_uid == instance.sop_class_uid
        seen.append((instance.sop_instance_uid, session.in_transaction() and instance.id is not None, committed))

    holder.append(start_node(intake=intake))
    node = holder[0]
    ct, cr = pydicom_file("CT_small.dcm"), pydicom_file("RG1_UNCR.dcm")
    assert storescu(node, ct, cr).returncode == 0
    assert storescu(node, ct).returncode == 0  # identical resend: no second intake
    uids = [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in (ct, cr)]
    assert seen == [(uids[0], True, 0), (uids[1], True, 1)]


def test_a_failing_intake_fails_the_store_and_leaves_nothing(start_node: Callable[..., Node]) -> None:
    def intake(session: Session, instance: ReceivedRow, facts: InstanceFacts) -> None:
        raise RuntimeError("rule engine broken")

    node = start_node(intake=intake)
    (result,) = send(node.peer(), CALLING, [pydicom_file("CT_small.dcm")])
    assert result.status == OUT_OF_RESOURCES
    assert node.instances() == [] and node.files() == []
    assert list(node.store.root.rglob(".partial-*")) == []


# ---- The completeness check on its own ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["CT_small.dcm", "JPEG-LL.dcm", "MR_small_bigendian.dcm", "image_dfl.dcm"])
def test_check_complete_accepts_whole_data_sets_and_refuses_every_cut(name: str) -> None:
    path = pydicom_file(name)
    syntax = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
    body = body_of(path)
    check_complete(body, syntax)
    # Cuts inside an element or a deflate stream (a cut on an element boundary leaves a shorter whole).
    for cut in (1, 7, len(body) // 3, len(body) // 2, len(body) - (100 if syntax.is_deflated else 3)):
        with pytest.raises(DicomInputError):
            check_complete(body[:cut], syntax)


# ---- Stopping -----------------------------------------------------------------------------------------


def test_stop_refuses_new_associations_and_lets_a_running_one_finish(node: Node) -> None:
    ae = AE(ae_title=CALLING)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=AE_TITLE)
    assert assoc.is_established
    stopper = threading.Thread(target=node.scp.stop, kwargs={"timeout_s": 20})
    stopper.start()

    def refused() -> bool:
        try:
            socket.create_connection(("127.0.0.1", node.port), timeout=1).close()
        except OSError:
            return True
        return False

    wait_until(refused)
    assert stopper.is_alive()  # still waiting for the running association
    status = assoc.send_c_store(pydicom.dcmread(pydicom_file("CT_small.dcm")))
    assert status.Status == 0x0000
    assoc.release()
    stopper.join(5)
    assert not stopper.is_alive()
    (row,) = node.associations()
    assert row.ended_at is not None and row.n_instances == 1 and len(node.instances()) == 1
