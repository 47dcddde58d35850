"""The SCP's direct path (:mod:`dicomnode.direct_association`) and its receiving processes, against real
peers on loopback: pynetdicom and dcmtk requestors, and hand-made PDUs over a bare socket.

Each test says which path served the association (``StorageSCP.direct.count()`` while it is open, or
a rejection reason only the direct path writes), reads back what was stored byte for byte, and
checks the association rows the node recorded.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from prometheus_client import CollectorRegistry
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.dsutils import decode, encode
from pynetdicom.pdu_primitives import (
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    StorageCommitmentPushModel,
    Verification,
)

from dicomnode.console.metrics import ScpMetrics
from tests.conftest import dcmtk
from tests.dicom_nodes import AE_TITLE, CALLING, Node, body_of, dcmtk_run, pydicom_file, wait_until
from tests.raw_dicom import association_request, closed_by_peer, read_pdu
from tests.test_scp_intake import small_dx

DX = DigitalXRayImageStorageForPresentation
A_ASSOCIATE_AC, A_ASSOCIATE_RJ, P_DATA_TF, A_RELEASE_RP, A_ABORT = 0x02, 0x03, 0x04, 0x06, 0x07
RELEASE_RQ = b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00"
# Rejected-transient, service-provider (presentation), local-limit-exceeded (PS3.8 Table 9-21)
LOCAL_LIMIT_EXCEEDED = b"\x03\x00\x00\x00\x00\x04\x00\x02\x03\x02"


def dx_file(path: Path, size: int = 64) -> Path:
    """A DX For Presentation file, 16-bit ``size`` x ``size`` random pixels, Explicit VR Little Endian."""
    ds = small_dx(size, size)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.PixelData = os.urandom(size * size * 2)
    ds.save_as(path, enforce_file_format=True)
    return path


def stored_bodies(node: Node) -> dict[str, bytes]:
    """The data set bytes of every stored instance, by SOP Instance UID.

    Receiving processes store under ``node.storage_dir`` itself, as ``dicomnode serve`` does; the
    test factory's own store (``Node.store``) is rooted in its ``instances`` folder.
    """
    root = node.settings.node.storage_dir if node.scp.direct.pool is not None else node.store.root
    return {row.sop_instance_uid: body_of(root / row.path) for row in node.instances()}


def echoscu(node: Node) -> subprocess.CompletedProcess[str]:
    return dcmtk_run("echoscu", "-aet", CALLING, "-aec", AE_TITLE, "127.0.0.1", str(node.port))


def storescu(node: Node, *paths: Path, options: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return dcmtk_run(
        "storescu", *options, "-aet", CALLING, "-aec", AE_TITLE, "127.0.0.1", str(node.port), *map(str, paths)
    )


def general_associations(node: Node) -> list[object]:
    """Associations pynetdicom serves for the node right now (the general path)."""
    return [a for a in node.scp._ae.active_associations if a.is_acceptor and a.is_alive()]


# ---- Hand-made PDUs -------------------------------------------------------------------------------------


def p_data_tf(*pdvs: tuple[int, int, bytes]) -> bytes:
    """A P-DATA-TF PDU of (context id, message control header, fragment) PDV items (PS3.8 9.3.5)."""
    body = b"".join(struct.pack(">LBB", len(value) + 2, context, flags) + value for context, flags, value in pdvs)
    return struct.pack(">BBL", P_DATA_TF, 0, len(body)) + body


def command_set(**elements: object) -> bytes:
    """A command set in Implicit VR Little Endian with its Command Group Length, encoded by pydicom."""
    ds = Dataset()
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    body = encode(ds, True, True)
    group = Dataset()
    group.CommandGroupLength = len(body or b"")
    return (encode(group, True, True) or b"") + (body or b"")


def echo_rq(message_id: int) -> bytes:
    return command_set(
        AffectedSOPClassUID=Verification, CommandField=0x0030, MessageID=message_id, CommandDataSetType=0x0101
    )


def read_command(sock: socket.socket) -> tuple[int, Dataset]:
    """The next command set the node sends (its P-DATA-TF PDUs reassembled), and its context id."""
    fragments, context = b"", 0
    while True:
        raw = read_pdu(sock)
        assert raw and raw[0] == P_DATA_TF, f"expected P-DATA-TF, got {raw[:10].hex()}"
        i = 6
        while i < len(raw):
            (length,) = struct.unpack_from(">L", raw, i)
            context, flags = raw[i + 4], raw[i + 5]
            assert flags & 0x01, "a data set fragment where a command was expected"
            fragments += raw[i + 6 : i + 4 + length]
            i += 4 + length
            if flags & 0x02:
                return context, decode(BytesIO(fragments), True, True)


def storage_request(abstract: str) -> bytes:
    """An A-ASSOCIATE-RQ PDU (pynetdicom's encoding) proposing ``abstract`` in Explicit VR Little Endian, id 1."""
    return association_request(abstract_syntax=abstract, transfer_syntax=ExplicitVRLittleEndian)


def answer_to(node: Node, request: bytes) -> bytes:
    """The node's answer to an association request sent over a bare socket.

    A bare socket, not a pynetdicom requestor: one that is rejected within a few milliseconds may
    close its transport before the requestor's ACSE looks at it, and then reports an abort instead.
    """
    with socket.create_connection(("127.0.0.1", node.port)) as sock:
        sock.sendall(request)
        return read_pdu(sock)


@contextmanager
def accepted(node: Node, request: bytes | None = None) -> Iterator[socket.socket]:
    """A bare socket on which the node accepted an association (Verification unless ``request`` says)."""
    with socket.create_connection(("127.0.0.1", node.port)) as sock:
        sock.sendall(request or association_request())
        answer = read_pdu(sock)
        assert answer[0] == A_ASSOCIATE_AC, answer[:10].hex()
        assert node.scp.direct.count() == 1
        yield sock


# ---- 1. Which path serves what --------------------------------------------------------------------------


def test_a_pynetdicom_storage_association_is_served_on_the_direct_path_and_stores_the_bytes_sent(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dicomnode.scp")
    path = pydicom_file("CT_small.dcm")
    ae = AE(ae_title=CALLING)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=AE_TITLE)
    assert assoc.is_established
    try:
        assert node.scp.direct.count() == 1 and node.scp.direct.count("127.0.0.1") == 1
        assert node.scp.direct.count("127.0.0.2") == 0 and general_associations(node) == []
        assert assoc.acceptor.maximum_length == node.settings.node.maximum_pdu_bytes
        assert assoc.acceptor.implementation_class_uid == node.scp._ae.implementation_class_uid
        assert [str(c.abstract_syntax) for c in assoc.accepted_contexts] == [CTImageStorage, Verification]
        assert assoc.send_c_echo().Status == 0x0000
        status = assoc.send_c_store(path)  # a path: pynetdicom sends the file's data set bytes as they are
        assert status.Status == 0x0000
    finally:
        assoc.release()
    wait_until(lambda: "released after" in caplog.text and node.scp.direct.count() == 0)
    (row,) = node.instances()
    assert row.sop_instance_uid == pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
    assert body_of(node.store.absolute(row.path)) == body_of(path)
    (association,) = node.associations()
    assert association.ended_at is not None
    assert (association.accepted, association.calling_ae, association.called_ae, association.n_instances) == (
        True,
        CALLING,
        AE_TITLE,
        1,
    )
    assert row.association_id == association.id
    assert f"association {association.id}: released after 1 new instances" in caplog.text


def _commitment(ae: AE) -> dict[str, object]:
    ae.add_requested_context(StorageCommitmentPushModel)
    return {}


def _role_selection(ae: AE) -> dict[str, object]:
    role = SCP_SCU_RoleSelectionNegotiation()
    role.sop_class_uid = CTImageStorage
    role.scu_role, role.scp_role = True, False
    ae.add_requested_context(CTImageStorage)
    return {"ext_neg": [role]}


@pytest.mark.parametrize("propose", [_commitment, _role_selection], ids=["storage commitment", "role selection"])
def test_what_the_direct_path_does_not_take_pynetdicom_still_serves(
    node: Node, propose: Callable[[AE], dict[str, object]]
) -> None:
    ae = AE(ae_title=CALLING)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=AE_TITLE, **propose(ae))  # type: ignore[arg-type]
    assert assoc.is_established
    try:
        assert node.scp.direct.count() == 0 and len(general_associations(node)) == 1
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()
    wait_until(lambda: all(a.ended_at for a in node.associations()))
    (row,) = node.associations()
    assert row.accepted and row.ended_at is not None


def test_the_total_cap_counts_associations_on_both_paths(
    start_node: Callable[..., Node], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="dicomnode.scp")
    node = start_node(node="max_associations = 1")
    plain = AE(ae_title=CALLING)
    plain.add_requested_context(Verification)
    committing = AE(ae_title=CALLING)
    committing.add_requested_context(StorageCommitmentPushModel)
    held = plain.associate("127.0.0.1", node.port, ae_title=AE_TITLE)
    assert held.is_established and node.scp.direct.count() == 1
    assert answer_to(node, storage_request(StorageCommitmentPushModel)) == LOCAL_LIMIT_EXCEEDED  # general path
    held.release()
    wait_until(lambda: node.scp.direct.count() == 0)
    held = committing.associate("127.0.0.1", node.port, ae_title=AE_TITLE)
    assert held.is_established and len(general_associations(node)) == 1
    assert answer_to(node, association_request()) == LOCAL_LIMIT_EXCEEDED  # direct path
    held.release()
    wait_until(lambda: caplog.text.count("rejected from") == 2)
    rows = node.associations()
    assert sorted(a.accepted for a in rows) == [False, False, True, True]
    assert {a.reason for a in rows if not a.accepted} == {"more than 1 associations at once"}


# ---- 2. Fragmented data sets ----------------------------------------------------------------------------


def test_storescu_splits_a_large_data_set_into_many_pdus_within_the_nodes_maximum(
    start_node: Callable[..., Node], tmp_path: Path
) -> None:
    node = start_node(node="maximum_pdu_bytes = 4096")
    path = dx_file(tmp_path / "large.dcm", size=256)  # 128 KiB of pixels: over 32 P-DATA-TF PDUs
    result = storescu(node, path, options=("-d",))
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert "Association Accepted (Max Send PDV: 4084)" in output  # the sender fragments to the node's maximum
    (row,) = node.instances()
    assert body_of(node.store.absolute(row.path)) == body_of(path)
    assert row.size_bytes == (node.store.absolute(row.path)).stat().st_size


# ---- 3. Protocol errors ---------------------------------------------------------------------------------


def _abort_expected(sock: socket.socket, send: bytes) -> bytes:
    sock.sendall(send)
    started = time.monotonic()
    answer = read_pdu(sock, timeout_s=5)
    assert time.monotonic() - started < 3  # answered at once, not after network_timeout_s (10 s)
    assert closed_by_peer(sock, timeout_s=3)
    return answer


PROTOCOL_ERRORS = {
    # name: (what is sent after the A-ASSOCIATE-AC, the A-ABORT reason)
    "a PDV on a context that was not accepted": (
        p_data_tf((3, 0x03, echo_rq(1))),
        6,  # invalid-PDU-parameter value
    ),
    "an unknown PDU type": (b"\x09\x00" + struct.pack(">L", 4) + bytes(4), None),
    "a PDU longer than the maximum": (
        struct.pack(">BBL", P_DATA_TF, 0, 1048576 + 65536 + 1),  # only the header: the rest is never sent
        6,
    ),
    "a data set fragment without its command": (p_data_tf((1, 0x02, b"\x08\x00\x16\x00")), 2),  # unexpected-PDU
    "a PDV longer than its PDU": (b"\x04\x00" + struct.pack(">L", 10) + struct.pack(">LBB", 100, 1, 3) + bytes(4), 6),
    # 65 command fragments of 1 KiB, none the last: no command set is that long
    "a command set over 64 KiB": (b"".join(p_data_tf((1, 0x01, bytes(1024))) for _ in range(65)), 6),
}


@pytest.mark.parametrize("name", PROTOCOL_ERRORS)
def test_a_protocol_error_is_answered_with_a_provider_abort_and_the_node_serves_on(name: str, node: Node) -> None:
    send, reason = PROTOCOL_ERRORS[name]
    with accepted(node) as sock:
        answer = _abort_expected(sock, send)
    assert answer[:7] == bytes((A_ABORT, 0, 0, 0, 0, 4, 0)) and len(answer) == 10
    assert answer[8] == 2  # source: service-provider (PS3.8 Table 9-26)
    if reason is not None:
        assert answer[9] == reason
    wait_until(lambda: node.scp.direct.count() == 0 and all(a.ended_at for a in node.associations()))
    assert node.instances() == [] and node.files() == []
    (row,) = node.associations()
    assert row.accepted and row.n_instances == 0
    result = echoscu(node)
    assert result.returncode == 0, result.stderr
    assert len(node.associations()) == 2


def test_a_message_left_unfinished_is_aborted_after_the_dimse_timeout(start_node: Callable[..., Node]) -> None:
    node = start_node(node="dimse_timeout_s = 0.5")  # network_timeout_s stays 10: the wait for a new message
    with accepted(node) as sock:
        sock.sendall(p_data_tf((1, 0x01, echo_rq(1)[:20])))  # the start of a command, never its end
        started = time.monotonic()
        answer = read_pdu(sock, timeout_s=5)
        waited = time.monotonic() - started
        assert closed_by_peer(sock, timeout_s=3)
    assert answer[0] == A_ABORT and answer[8] == 2, answer.hex()
    assert 0.4 <= waited < 3, waited
    wait_until(lambda: node.scp.direct.count() == 0)
    assert node.instances() == []


def test_an_unrecognized_pdu_type_is_aborted_with_reason_unrecognized_pdu(node: Node) -> None:
    with accepted(node) as sock:
        answer = _abort_expected(sock, b"\x09\x00" + struct.pack(">L", 4) + bytes(4))
    assert answer == bytes((A_ABORT, 0, 0, 0, 0, 4, 0, 0, 2, 1))


def test_an_unknown_command_is_answered_unrecognized_and_the_association_continues(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dicomnode")
    unknown = command_set(
        AffectedSOPClassUID=Verification, CommandField=0x0FFF, MessageID=41, CommandDataSetType=0x0101
    )
    with accepted(node) as sock:
        sock.sendall(p_data_tf((1, 0x03, unknown)))
        context, response = read_command(sock)
        assert context == 1
        assert (response.CommandField, response.MessageIDBeingRespondedTo, response.Status) == (0x8FFF, 41, 0x0211)
        assert response.CommandDataSetType == 0x0101 and response.AffectedSOPClassUID == Verification
        # A C-ECHO whose command arrives in two PDUs, then one in two PDVs of one PDU.
        echo = echo_rq(42)
        sock.sendall(p_data_tf((1, 0x01, echo[:20])))
        sock.sendall(p_data_tf((1, 0x03, echo[20:])))
        _, response = read_command(sock)
        assert (response.CommandField, response.MessageIDBeingRespondedTo, response.Status) == (0x8030, 42, 0)
        echo = echo_rq(43)
        sock.sendall(p_data_tf((1, 0x01, echo[:11]), (1, 0x03, echo[11:])))
        _, response = read_command(sock)
        assert (response.CommandField, response.MessageIDBeingRespondedTo, response.Status) == (0x8030, 43, 0)
        sock.sendall(RELEASE_RQ)
        assert read_pdu(sock) == bytes((A_RELEASE_RP, 0, 0, 0, 0, 4, 0, 0, 0, 0))
        assert closed_by_peer(sock, timeout_s=3)
    wait_until(lambda: "released after" in caplog.text)
    (row,) = node.associations()
    assert row.ended_at is not None
    assert f"association {row.id}: command 0x0FFF on 1.2.840.10008.1.1 not supported" in caplog.text
    assert f"association {row.id}: released after 0 new instances" in caplog.text


def test_a_c_store_whose_command_and_data_set_share_one_pdu_is_stored_whole(node: Node, tmp_path: Path) -> None:
    path = dx_file(tmp_path / "one-pdu.dcm")
    data = body_of(path)
    uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
    command = command_set(
        AffectedSOPClassUID=DX,
        CommandField=0x0001,
        MessageID=5,
        Priority=0,
        CommandDataSetType=0x0000,
        AffectedSOPInstanceUID=uid,
    )
    with accepted(node, storage_request(DX)) as sock:
        # The command, then the data set in three PDVs, all in one P-DATA-TF PDU.
        pdvs = [(1, 0x03, command), (1, 0x00, data[:100]), (1, 0x00, data[100:1001]), (1, 0x02, data[1001:])]
        sock.sendall(p_data_tf(*pdvs))
        _, response = read_command(sock)
        assert (response.CommandField, response.MessageIDBeingRespondedTo, response.Status) == (0x8001, 5, 0x0000)
        assert (response.AffectedSOPClassUID, response.AffectedSOPInstanceUID) == (DX, uid)
        sock.sendall(RELEASE_RQ)
        assert read_pdu(sock)[0] == A_RELEASE_RP
    assert stored_bodies(node) == {uid: data}


def test_stop_aborts_an_idle_direct_association_once_its_time_is_up(node: Node) -> None:
    with accepted(node) as sock:
        stopper = threading.Thread(target=node.scp.stop, kwargs={"timeout_s": 0.5}, daemon=True)
        started = time.monotonic()
        stopper.start()
        try:
            answer = read_pdu(sock, timeout_s=3)  # network_timeout_s is 10
        finally:
            sock.close()  # ends the association either way, so stop() returns
            stopper.join(15)
    assert answer == bytes((A_ABORT, 0, 0, 0, 0, 4, 0, 0, 2, 0)) and time.monotonic() - started < 3
    (row,) = node.associations()
    assert row.ended_at is not None


# ---- 4. Rejections on the direct path -------------------------------------------------------------------


def _application_context(raw: bytearray) -> bytearray:
    at = raw.index(b"1.2.840.10008.3.1.1.1")
    raw[at : at + 21] = b"1.2.840.10008.3.1.1.9"
    return raw


def _protocol_version(raw: bytearray) -> bytearray:
    raw[6:8] = b"\x00\x00"
    return raw


REJECTIONS = {
    # name: (request, (result, source, reason), the recorded reason)
    "application context": (
        _application_context(bytearray(association_request())),
        (1, 1, 2),
        "application context 1.2.840.10008.3.1.1.9 not supported",
    ),
    "protocol version 0": (
        _protocol_version(bytearray(association_request())),
        (1, 2, 2),
        "protocol version 0 not supported",
    ),
    "called AE title": (
        association_request(called_ae=b"ELSEWHERE"),
        (1, 1, 7),
        "called AE 'ELSEWHERE' is not 'SVDRR'",
    ),
    "calling AE title": (
        association_request(calling_ae=b"STRANGER"),
        (1, 1, 3),
        "calling AE 'STRANGER' not in allowed list",
    ),
}


@pytest.mark.parametrize("name", REJECTIONS)
def test_a_request_the_direct_path_takes_is_rejected_with_the_exact_pdu_and_recorded(name: str, node: Node) -> None:
    request, (result, source, reason), text = REJECTIONS[name]
    assert answer_to(node, bytes(request)) == bytes((A_ASSOCIATE_RJ, 0, 0, 0, 0, 4, 0, result, source, reason))
    wait_until(lambda: len(node.associations()) == 1)
    (row,) = node.associations()
    assert (row.accepted, row.reason, row.peer_host) == (False, text, "127.0.0.1")
    assert node.scp.direct.count() == 0
    assert echoscu(node).returncode == 0


# ---- 5. Receiving processes -----------------------------------------------------------------------------


def _folders(root: Path, associations: int, files: int) -> list[Path]:
    folders = []
    root.mkdir()
    for a in range(associations):
        folder = root / f"a{a}"
        folder.mkdir()
        for i in range(files):
            dx_file(folder / f"{i}.dcm")
        folders.append(folder)
    return folders


def _concurrent_storescu(node: Node, folders: list[Path]) -> list[int]:
    env = {**os.environ, "TCP_NODELAY": "1"}
    command = [dcmtk("storescu"), "-aet", CALLING, "-aec", AE_TITLE, "127.0.0.1", str(node.port), "+sd"]
    procs = [
        subprocess.Popen([*command, str(f)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        for f in folders
    ]
    return [p.wait(60) for p in procs]


def test_receiving_processes_store_concurrent_associations_and_report_to_the_metrics(
    start_node: Callable[..., Node], tmp_path: Path
) -> None:
    node = start_node(node="receive_processes = 2")
    pool = node.scp.direct.pool
    assert pool is not None and len(pool._receivers) == 2
    registry = CollectorRegistry()
    ScpMetrics(registry).bind(node.scp)
    folders = _folders(tmp_path / "send", associations=4, files=2)
    assert _concurrent_storescu(node, folders) == [0, 0, 0, 0]
    sent = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for f in folders for p in f.iterdir()}
    assert stored_bodies(node) == {uid: body_of(path) for uid, path in sent.items()}
    wait_until(lambda: node.scp.direct.count() == 0)
    rows = node.associations()
    assert len(rows) == 4 and all(a.accepted and a.ended_at and a.n_instances == 2 for a in rows)
    assert {a.id for a in rows} == {row.association_id for row in node.instances()}

    def sample(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    # Counted in this (the serving) process, though the receiving processes answered.
    wait_until(lambda: sample("dicomnode_cstore_requests_total", status="0x0000") == 8)
    assert sample("dicomnode_associations_total", result="accepted") == 4
    assert sample("dicomnode_associations_total", result="rejected") == 0
    assert sample("dicomnode_received_bytes_total") == sum(len(body_of(p)) for p in sent.values())


def test_the_per_peer_cap_holds_across_receiving_processes(start_node: Callable[..., Node]) -> None:
    node = start_node(node="receive_processes = 2\nmax_associations_per_peer = 1")
    ae = AE(ae_title=CALLING)
    ae.add_requested_context(Verification)
    held = ae.associate("127.0.0.1", node.port, ae_title=AE_TITLE)
    assert held.is_established
    try:
        assert node.scp.direct.count("127.0.0.1") == 1
        assert answer_to(node, association_request()) == LOCAL_LIMIT_EXCEEDED
        assert held.send_c_echo().Status == 0x0000
    finally:
        held.release()
    wait_until(lambda: node.scp.direct.count() == 0)  # the receiving process reported the end
    again = ae.associate("127.0.0.1", node.port, ae_title=AE_TITLE)
    assert again.is_established
    again.release()
    # The rejection is recorded once the requestor has closed the connection: perhaps after the third.
    wait_until(lambda: len(node.associations()) == 3 and all(a.ended_at for a in node.associations() if a.accepted))
    (rejected,) = [a for a in node.associations() if not a.accepted]
    assert rejected.reason == "more than 1 associations at once from 127.0.0.1"


def test_a_killed_receiving_process_is_replaced_and_its_open_association_slot_released(
    start_node: Callable[..., Node], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dicomnode.receivers")
    node = start_node(node="receive_processes = 2\nmax_associations_per_peer = 1")
    pool = node.scp.direct.pool
    assert pool is not None
    # Killed while idle: another process takes its place.
    old = pool._receivers[0].process.pid
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: pool._receivers[0].process.pid != old and pool._receivers[0].process.is_alive(), 30)
    assert "receiving process 0 exited (code -9), 0 association(s) lost" in caplog.text
    path = dx_file(tmp_path / "after-kill.dcm")
    result = storescu(node, path)
    assert result.returncode == 0, result.stderr
    assert stored_bodies(node) == {pydicom.dcmread(path).SOPInstanceUID: body_of(path)}
    # Killed while serving: the peer's slot is free again (the per-peer cap is 1).
    wait_until(lambda: node.scp.direct.count() == 0)
    ae = AE(ae_title=CALLING)
    ae.add_requested_context(Verification)
    held = ae.associate("127.0.0.1", node.port, ae_title=AE_TITLE)
    assert held.is_established and node.scp.direct.count("127.0.0.1") == 1
    (serving,) = [r for r in pool._receivers if r.running]
    old = serving.process.pid
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: not held.is_established)
    wait_until(lambda: node.scp.direct.count() == 0)
    wait_until(lambda: f"receiving process {serving.index} exited (code -9), 1 association(s) lost" in caplog.text)
    # A connection handed over before the replacement is listed would go to the dead process (see the report).
    wait_until(lambda: pool._receivers[serving.index].process.pid != old, 30)
    result = echoscu(node)
    assert result.returncode == 0, result.stderr
