"""Issue #10 probes against a real node on loopback: what the SCP must refuse, with the exact status,
logged once with the association id, and leaving nothing stored; idle connections and one greedy
peer must not lock others out; peer-chosen values must not forge log lines.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless, generate_uid
from pynetdicom import AE
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    MRImageStorage,
    Verification,
)

from dicomnode.config import NodeSettings, load_settings
from dicomnode.dataset_checks import (
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
    ELEMENT_INVALID,
    ENCAPSULATION_INVALID,
    INVALID_UID,
    NO_PIXEL_DATA,
    PIXEL_DATA_ENCODING,
    PIXEL_DATA_LENGTH,
    check_c_store,
)
from dicomnode.errors import ConfigError
from dicomnode.log_escape import SingleLineMessages, printable
from tests.conftest import dcmtk
from tests.dicom_nodes import AE_TITLE, CALLING, Node, body_of, pydicom_file, wait_until
from tests.raw_dicom import association_request, closed_by_peer, raw_store, read_pdu

DX = DigitalXRayImageStorageForPresentation
PIXEL_HEADER = b"\xe0\x7f\x10\x00"


def small_dx(rows: int = 32, columns: int = 24, bits: int = 16) -> Dataset:
    """A small but complete DX For Presentation image (native, Explicit VR Little Endian)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.SOPClassUID = DX
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "DX"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    ds.PixelData = bytes(rows * columns * bits // 8)
    ds["PixelData"].VR = "OW" if bits > 8 else "OB"
    return ds


def body(ds: Dataset) -> bytes:
    data = encode(ds, False, True)
    assert data is not None
    return data


def refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "dicomnode.scp" and "refused with 0x" in r.getMessage()]


def assert_refused_once(
    node: Node, caplog: pytest.LogCaptureFixture, result: tuple[int, str], status: int, comment: str
) -> None:
    code, text = result
    assert (code, comment in text) == (status, True), f"0x{code:04X} {text!r}"
    assert node.instances() == [] and node.files() == []
    (line,) = refusals(caplog)
    assert re.match(rf"association \d+: C-STORE of .* refused with 0x{status:04X}: ", line), line


# ---- Data sets the node must not acknowledge --------------------------------------------------------


def _no_pixels() -> tuple[str, bytes]:
    ds = small_dx()
    del ds.PixelData
    return ds.SOPInstanceUID, body(ds)


def _pixels_of(length: int) -> tuple[str, bytes]:
    ds = small_dx()
    ds.PixelData = bytes(length)
    return ds.SOPInstanceUID, body(ds)


def _cut_before_pixels() -> tuple[str, bytes]:
    ds = small_dx()
    data = body(ds)
    return ds.SOPInstanceUID, data[: data.index(PIXEL_HEADER)]


def _body_part(vr: bytes, value: bytes) -> tuple[str, bytes]:
    """Body Part Examined (0018,0015) re-encoded with another VR code and value."""
    ds = small_dx()
    data = body(ds)
    start = data.index(b"\x18\x00\x15\x00CS")
    old_length = int.from_bytes(data[start + 6 : start + 8], "little")
    if vr == b"SQ":  # a long VR: two reserved bytes and a 32-bit length (PS3.5 7.1.2)
        element = b"\x18\x00\x15\x00SQ\x00\x00" + len(value).to_bytes(4, "little") + value
    else:
        element = b"\x18\x00\x15\x00" + vr + len(value).to_bytes(2, "little") + value
    return ds.SOPInstanceUID, data[:start] + element + data[start + 8 + old_length :]


def _jpeg2000_body() -> tuple[str, bytes]:
    path = pydicom_file("RG1_J2KR.dcm")
    return pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID, body_of(path)


def _encapsulated(offsets_ok: bool = True, frames: int = 2, fragment: int = 100) -> tuple[str, bytes]:
    ds = small_dx()
    ds.NumberOfFrames = frames
    if fragment % 2:  # pydicom pads fragments; write the items by hand
        item = b"\xfe\xff\x00\xe0"
        ds.PixelData = item + bytes(4) + (item + fragment.to_bytes(4, "little") + bytes(fragment)) * 2
    else:
        ds.PixelData = encapsulate([bytes(fragment)] * 2, has_bot=True)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    data = body(ds)
    if not offsets_ok:  # the second offset points into the first fragment
        bot = data.index(PIXEL_HEADER) + 12 + 8
        data = data[: bot + 4] + (8).to_bytes(4, "little") + data[bot + 8 :]
    return ds.SOPInstanceUID, data


def _mr_body() -> tuple[str, bytes]:
    path = pydicom_file("MR_small.dcm")
    return pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID, body_of(path)


HALF = 32 * 24 * 2 // 2

PROBES = {
    # name: (context class, transfer syntax, command class, data set, status, comment)
    "pixel data of 0 bytes": (DX, None, DX, lambda: _pixels_of(0), PIXEL_DATA_LENGTH, "is 0 bytes"),
    "pixel data half as long": (DX, None, DX, lambda: _pixels_of(HALF), PIXEL_DATA_LENGTH, f"is {HALF} bytes"),
    "no pixel data": (DX, None, DX, _no_pixels, NO_PIXEL_DATA, "without Pixel Data"),
    "cut just before pixel data": (DX, None, DX, _cut_before_pixels, NO_PIXEL_DATA, "without Pixel Data"),
    "JPEG 2000 data set on an Explicit VR LE context": (
        ComputedRadiographyImageStorage,
        None,
        ComputedRadiographyImageStorage,
        _jpeg2000_body,
        PIXEL_DATA_ENCODING,
        "encapsulated Pixel Data under native",
    ),
    "native pixel data on a JPEG 2000 context": (
        DX,
        JPEG2000Lossless,
        DX,
        lambda: _pixels_of(32 * 24 * 2),
        PIXEL_DATA_ENCODING,
        "native Pixel Data under compressed",
    ),
    "Basic Offset Table pointing into a fragment": (
        DX,
        JPEG2000Lossless,
        DX,
        lambda: _encapsulated(offsets_ok=False),
        ENCAPSULATION_INVALID,
        "Basic Offset Table",
    ),
    "fewer fragments than frames": (
        DX,
        JPEG2000Lossless,
        DX,
        lambda: _encapsulated(frames=3),
        ENCAPSULATION_INVALID,
        "2 Pixel Data fragments for 3 frames",
    ),
    "odd fragment length": (
        DX,
        JPEG2000Lossless,
        DX,
        lambda: _encapsulated(fragment=99),
        ENCAPSULATION_INVALID,
        "odd length",
    ),
    "MR command and data set on a DX context": (
        DX,
        None,
        MRImageStorage,
        _mr_body,
        DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
        "not the context's",
    ),
    "MR data set under a DX command": (DX, None, DX, _mr_body, DATA_SET_DOES_NOT_MATCH_SOP_CLASS, "SOP Class UID"),
    "Body Part Examined with an invalid VR code": (
        DX,
        None,
        DX,
        lambda: _body_part(b"\x00\x01", b"CHEST "),
        ELEMENT_INVALID,
        "(0018,0015) has invalid VR",
    ),
    "Body Part Examined that does not parse": (
        DX,
        None,
        DX,
        lambda: _body_part(b"SQ", b"CHEST "),
        ELEMENT_INVALID,
        "cannot be parsed",
    ),
    "Body Part Examined with a NUL byte": (
        DX,
        None,
        DX,
        lambda: _body_part(b"CS", b"CHE\x00ST"),
        ELEMENT_INVALID,
        "body_part_examined holds a control character",
    ),
}


@pytest.mark.parametrize("name", PROBES)
def test_a_malformed_c_store_is_refused_with_its_status_logged_once_and_nothing_stored(
    name: str, node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="dicomnode.scp")
    context_class, syntax, command_class, make, status, comment = PROBES[name]
    uid, data = make()
    with raw_store(node.port, context_class, *([syntax] if syntax else [])) as store:
        result = store(uid, data, command_class=command_class)
    wait_until(lambda: all(a.ended_at for a in node.associations()))
    assert_refused_once(node, caplog, result, status, comment)


def test_well_formed_small_images_are_stored_native_padded_and_encapsulated(node: Node) -> None:
    odd = small_dx(rows=3, columns=3, bits=8)  # 9 bytes of pixels, stored with one padding byte
    assert len(body(odd)) % 2 == 0 and len(odd.PixelData) in (9, 10)
    with raw_store(node.port, DX) as store:
        assert store(odd.SOPInstanceUID, body(odd)) == (0x0000, "")
        plain = small_dx()
        assert store(plain.SOPInstanceUID, body(plain)) == (0x0000, "")
    uid, data = _encapsulated()
    with raw_store(node.port, DX, JPEG2000Lossless) as store:
        assert store(uid, data) == (0x0000, "")
    assert {row.sop_instance_uid for row in node.instances()} == {odd.SOPInstanceUID, plain.SOPInstanceUID, uid}


def test_the_node_keeps_serving_after_refusals(node: Node) -> None:
    with raw_store(node.port, DX) as store:
        for _, (_, _, _, make, _, _) in list(PROBES.items())[:4]:
            uid, data = make()
            assert store(uid, data)[0] != 0
        good = small_dx()
        assert store(good.SOPInstanceUID, body(good)) == (0x0000, "")
    assert [row.sop_instance_uid for row in node.instances()] == [good.SOPInstanceUID]


def test_check_c_store_accepts_the_shipped_real_files() -> None:
    for name in ("RG1_UNCR.dcm", "RG1_J2KR.dcm", "JPEG-LL.dcm", "emri_small_RLE.dcm", "MR_small_bigendian.dcm"):
        path = pydicom_file(name)
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        body = body_of(path)
        received = check_c_store(
            body, ds.file_meta.TransferSyntaxUID, ds.SOPClassUID, ds.SOPClassUID, ds.SOPInstanceUID
        )
        assert received.fields["sop_instance_uid"] == ds.SOPInstanceUID


# ---- Log lines a peer cannot forge ---------------------------------------------------------------------


def test_printable_escapes_control_characters_and_caps_length() -> None:
    assert printable("1.2.3\nFORGED\r\x00\x1b\x85\u2028") == "1.2.3\\nFORGED\\r\\x00\\x1b\\x85\\u2028"
    assert printable(b"A\nB") == "A\\nB"
    assert printable("9" * 300) == "9" * 128 + "..."
    assert printable("ORIGINAL\\PRIMARY") == "ORIGINAL\\PRIMARY"


def test_a_newline_in_a_uid_cannot_forge_a_log_line(node: Node, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    ds = small_dx()
    forged = "1.2.3\n2026-01-01 00:00:00 INFO dicomnode.scp: association 1"
    ds.SOPInstanceUID = forged
    with raw_store(node.port, DX) as store:
        code, _ = store(forged, body(ds))
    assert code == INVALID_UID
    assert node.instances() == [] and node.files() == []
    (line,) = refusals(caplog)
    assert "1.2.3\\n2026-01-01" in line
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("dicomnode")]
    assert ours and not any("\n" in message for message in ours)


def test_a_newline_in_an_ae_title_cannot_forge_a_log_line(node: Node, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dicomnode")
    with socket.create_connection(("127.0.0.1", node.port)) as sock:
        sock.sendall(association_request(calling_ae=b"EVIL\nFORGED LINE"))
        answer = read_pdu(sock)
    assert answer == b"\x03\x00\x00\x00\x00\x04\x00\x01\x01\x03"  # RJ permanent, calling AE not recognized
    wait_until(lambda: "rejected from" in caplog.text)
    (line,) = [r.getMessage() for r in caplog.records if "rejected from" in r.getMessage()]
    assert "calling AE title 'EVIL\\nFORGED LINE' is not a valid AE title" in line
    ours = [r.getMessage() for r in caplog.records if r.name.startswith(("dicomnode", "pynetdicom"))]
    assert not any("FORGED" in message and "\n" in message for message in ours)
    (row,) = node.associations()
    assert row.accepted is False and "\n" not in row.calling_ae


def test_single_line_messages_escapes_whatever_a_library_logs() -> None:
    record = logging.LogRecord("pynetdicom.dul", logging.ERROR, __file__, 1, "Bad %r: %s", ("x", "A\nB"), None)
    assert SingleLineMessages().filter(record) and record.getMessage() == "Bad 'x': A\\nB"


# ---- The network edge -----------------------------------------------------------------------------------


def test_silent_connections_are_closed_and_never_take_an_association_slot(
    start_node: Callable[..., Node], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dicomnode.association_gate")
    node = start_node(node="max_associations = 2\nrequest_timeout_s = 1")
    idle = [socket.create_connection(("127.0.0.1", node.port)) for _ in range(3)]
    partial = socket.create_connection(("127.0.0.1", node.port))
    partial.sendall(association_request()[:20])  # a request that never completes
    try:
        time.sleep(0.2)
        started = time.monotonic()
        ae = AE(ae_title=CALLING)
        ae.add_requested_context(Verification)
        first = ae.associate("127.0.0.1", node.port, ae_title=AE_TITLE)
        second = ae.associate("127.0.0.1", node.port, ae_title=AE_TITLE)
        assert first.is_established and second.is_established  # all max_associations slots are real peers'
        assert first.send_c_echo().Status == 0x0000
        assert time.monotonic() - started < 1.0  # not served after the idle ones gave up
        first.release()
        second.release()
        assert all(closed_by_peer(sock, timeout_s=3) for sock in [*idle, partial])
    finally:
        for sock in [*idle, partial]:
            sock.close()
    wait_until(lambda: caplog.text.count("or sent no association request within 1 s; closed") == 4)
    assert [a.accepted for a in node.associations()] == [True, True]


def test_a_peer_over_its_cap_is_rejected_transient_and_others_still_served(
    start_node: Callable[..., Node], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="dicomnode.scp")
    node = start_node(node="max_associations_per_peer = 1")
    ae = AE(ae_title=CALLING)
    ae.add_requested_context(Verification)
    held = ae.associate("127.0.0.1", node.port, ae_title=AE_TITLE)
    assert held.is_established
    over = ae.associate("127.0.0.1", node.port, ae_title=AE_TITLE)
    assert over.is_rejected
    rejection = over.acceptor.primitive
    assert (rejection.result, rejection.result_source, rejection.diagnostic) == (2, 3, 2)
    wait_until(lambda: "rejected from" in caplog.text)
    rows = node.associations()
    assert [r.accepted for r in rows] == [True, False]
    assert rows[1].calling_ae == CALLING and rows[1].reason == "more than 1 associations at once from 127.0.0.1"
    assert f"association {rows[1].id}: rejected from 127.0.0.1" in caplog.text
    held.release()
    wait_until(lambda: not node.scp.direct.count() and not any(a.is_alive() for a in node.scp._ae.active_associations))
    again = ae.associate("127.0.0.1", node.port, ae_title=AE_TITLE)
    assert again.is_established
    again.release()


# ---- Settings -------------------------------------------------------------------------------------------


def test_the_new_node_keys_default_as_shipped_and_are_checked(tmp_path: Path) -> None:
    shipped = load_settings(Path(__file__).resolve().parents[1] / "config" / "dicomnode.toml", env={})
    defaults = NodeSettings(storage_dir=tmp_path)
    for s in (shipped.node, defaults):
        assert (s.request_timeout_s, s.max_associations_per_peer, s.maximum_pdu_bytes) == (5.0, 5, 1048576)
    for key, value in (("request_timeout_s", 0), ("max_associations_per_peer", -1), ("maximum_pdu_bytes", 100)):
        with pytest.raises(ConfigError, match=f"node.{key}"):
            NodeSettings(storage_dir=tmp_path, **{key: value})


# ---- Concurrent associations (group commit) ----------------------------------------------------------


def test_four_concurrent_storescu_associations_store_every_instance(node: Node, tmp_path: Path) -> None:
    folders = []
    for a in range(4):
        folder = tmp_path / f"a{a}"
        folder.mkdir()
        for i in range(6):
            ds = small_dx(rows=64, columns=64)
            ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
            ds.save_as(folder / f"{i}.dcm", enforce_file_format=True)
        folders.append(folder)
    env = {**os.environ, "TCP_NODELAY": "1"}
    procs = [
        subprocess.Popen(
            [dcmtk("storescu"), "-aet", CALLING, "-aec", AE_TITLE, "127.0.0.1", str(node.port), "+sd", str(f)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
        )
        for f in folders
    ]
    assert [p.wait(60) for p in procs] == [0, 0, 0, 0]
    sent = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for f in folders for p in f.iterdir()}
    rows = {row.sop_instance_uid: row for row in node.instances()}
    assert set(rows) == set(sent) and len(node.files()) == 24
    for uid, row in rows.items():
        assert body_of(node.store.absolute(row.path)) == body_of(sent[uid])
