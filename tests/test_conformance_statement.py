"""docs/conformance-statement.md cannot drift from the code: its tables are checked against what a
real StorageSCP negotiates, what the SCU proposes on real associations and what the writers emit.

Tables are the Markdown tables that follow a ``<!-- table: NAME -->`` line. Rows whose Status is
``implemented`` must match the code exactly; ``planned`` rows must not be in the code yet (switch
the row when the feature lands, and add its writer to :data:`WRITERS`).
"""

from __future__ import annotations

import io
import re
import socket
import struct
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from datetime import datetime
from importlib import import_module
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom._uid_dict import UID_dictionary
from pydicom.data import get_testdata_file
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, build_context, build_role, evt
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import StorageCommitmentPushModel, Verification  # type: ignore[attr-defined]

from dicomnode import commitment, dataset_checks, scp
from dicomnode.config import (
    EngineSettings,
    LoopPreventionSettings,
    NodeSettings,
    OutputSettings,
    PeerSettings,
    SchedulerSettings,
    SecuritySettings,
)
from dicomnode.derived import GeneratorInfo, build_derived_instances
from dicomnode.derived_sweep import build_sweep_instance
from dicomnode.rejection_note import build_rejection_note
from dicomnode.rules import Rule
from dicomnode.scu import echo, send
from synthesis import voi_window
from tests.dicom_nodes import CALLING, Node, node_factory, wait_until
from tests.raw_dicom import association_request, read_pdu
from tests.test_derived import full_cr_source

STATEMENT = Path(__file__).resolve().parents[1] / "docs" / "conformance-statement.md"
MAX_CONTEXTS = 128  # per association (PS3.8 9.3.2.2)
_MARKER = re.compile(r"<!-- table: ([a-z0-9-]+) -->")


def doc_tables() -> dict[str, list[dict[str, str]]]:
    """Every marked table of the statement: its rows as {header: cell}."""
    tables: dict[str, list[dict[str, str]]] = {}
    lines = STATEMENT.read_text().splitlines()
    for i, line in enumerate(lines):
        found = _MARKER.fullmatch(line.strip())
        if not found:
            continue
        block = []
        for row in lines[i + 1 :]:
            if not row.startswith("|"):
                break
            block.append([cell.strip() for cell in row.strip().strip("|").split("|")])
        header, separator, *rows = block
        assert set("".join(separator)) <= set("-: "), f"table {found[1]}: no header separator"
        assert all(len(row) == len(header) for row in rows), f"table {found[1]}: ragged rows"
        assert found[1] not in tables, f"table {found[1]} appears twice"
        tables[found[1]] = [dict(zip(header, row, strict=True)) for row in rows]
    return tables


TABLES = doc_tables()


def rows(name: str, status: str | None = None) -> list[dict[str, str]]:
    table = TABLES[name]
    assert table, f"table {name} is empty"
    if status is None:
        return table
    assert {row["Status"] for row in table} <= {"implemented", "planned"}, name
    return [row for row in table if row["Status"] == status]


def uids(name: str, column: str, status: str | None = None) -> list[str]:
    return [row[column] for row in rows(name, status)]


# ---- the writers: one sample builder per SOP class the node creates ----------------------------------
# Each builds real objects from a source radiograph (RG1_UNCR by default) with the built-in output
# settings, as the worker and `dicomnode recall` do.

OUTPUT = OutputSettings()
GENERATOR = GeneratorInfo(
    manufacturer=OUTPUT.manufacturer, model_name="svdrr-test", model_version="1", model_identity="5e" * 32,
    node_version="0",
)


def single_frame_sc(source: Dataset | None = None) -> list[Dataset]:
    source = source or pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    pixels = [np.arange(64 * 48, dtype=np.uint16).reshape(64, 48) % 4096 for _ in range(2)]
    return build_derived_instances(
        source, pixels, 12, None, None, [(-30.0, 0.0), (30.0, 0.0)], GENERATOR, seed=0, steps=1,
        guidance_scale=1.0, series_number=OUTPUT.series_number, modality=OUTPUT.modality,
        series_description_prefix=OUTPUT.series_description_prefix, content_datetime=datetime(2026, 1, 2, 3, 4, 5),
    )  # fmt: skip


def rotation_sweep(source: Dataset | None = None) -> list[Dataset]:
    """The sweep of the single views, as the worker builds it for a rule with ``sweep = true``."""
    sweep = build_sweep_instance(
        single_frame_sc(source),
        series_number=OUTPUT.sweep_series_number,
        series_description_prefix=OUTPUT.series_description_prefix,
        frame_time_ms=OUTPUT.sweep_frame_time_ms,
    )
    return [sweep]


def rejection_note(source: Dataset | None = None) -> list[Dataset]:
    """The rejection note recalling the single views, as `dicomnode recall` builds it from the stored files."""
    stored = [written(ds) for ds in single_frame_sc(source)]
    note = build_rejection_note(
        stored, "quality", manufacturer=OUTPUT.manufacturer, description="2 synthetic outputs recalled (quality)",
        series_number=OUTPUT.recall_series_number,
    )  # fmt: skip
    return [note]


WRITERS: dict[str, Callable[..., list[Dataset]]] = {
    "1.2.840.10008.5.1.4.1.1.7": single_frame_sc,
    "1.2.840.10008.5.1.4.1.1.7.3": rotation_sweep,
    "1.2.840.10008.5.1.4.1.1.88.59": rejection_note,
}
# The attribute annex of each written SOP class (Annex A.1 to A.3).
ANNEXES = {
    "1.2.840.10008.5.1.4.1.1.7": "sc-attributes",
    "1.2.840.10008.5.1.4.1.1.7.3": "mf-sc-attributes",
    "1.2.840.10008.5.1.4.1.1.88.59": "kos-attributes",
}


def written(ds: Dataset) -> Dataset:
    """``ds`` written as a Part 10 file and read back, as a peer receives it."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buffer.getvalue()))


# ---- fixtures: a real StorageSCP, and a recording SCP for the SCU's proposals -----------------------


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    with node_factory(tmp_path_factory.mktemp("conformance-node")) as start:
        yield start()


@pytest.fixture
def recorder() -> Iterator[tuple[PeerSettings, list[list[PresentationContext]]]]:
    """A pynetdicom SCP accepting storage, verification and storage commitment (answering N-ACTION
    Success, reporting nothing) that records each association's proposal."""
    proposals: list[list[PresentationContext]] = []
    lock = threading.Lock()

    def on_requested(event: evt.Event) -> None:
        with lock:
            proposals.append(list(event.assoc.requestor.requested_contexts))

    ae = AE(ae_title="RECORDER")
    ae.supported_contexts = [
        *AllStoragePresentationContexts, build_context(Verification), build_context(StorageCommitmentPushModel)
    ]
    handlers = [
        (evt.EVT_REQUESTED, on_requested),
        (evt.EVT_C_STORE, lambda event: 0x0000),
        (evt.EVT_N_ACTION, lambda event: (0x0000, None)),
    ]
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers)
    port = int(server.server_address[1])
    try:
        yield PeerSettings(name="recorder", ae_title="RECORDER", host="127.0.0.1", port=port), proposals
    finally:
        server.shutdown()


def negotiate(node: Node, contexts: list[tuple[str, str]]) -> set[tuple[str, str]]:
    """Propose (abstract syntax, transfer syntax) pairs, one context each, to the real SCP in as many
    associations as needed; return the pairs it accepted."""
    accepted: set[tuple[str, str]] = set()
    implementation = {row["Item"]: row["Value"] for row in rows("implementation")}
    for start in range(0, len(contexts), MAX_CONTEXTS - 1):
        ae = AE(ae_title=CALLING)
        # Context ID 1 is an anchor the SCP accepts, so that an association whose other contexts are
        # all refused is still established (and answered); it is not counted.
        ae.add_requested_context(Verification, ["1.2.840.10008.1.2"])
        for abstract_syntax, transfer_syntax in contexts[start : start + MAX_CONTEXTS - 1]:
            ae.add_requested_context(abstract_syntax, [transfer_syntax])
        assoc = ae.associate("127.0.0.1", node.port, ae_title=node.settings.node.ae_title)
        assert assoc.is_established, "the SCP refused an association it should accept"
        acceptor = assoc.acceptor
        assert acceptor.implementation_class_uid == implementation["Implementation Class UID"]
        assert acceptor.implementation_version_name == implementation["Implementation Version Name"]
        assert acceptor.maximum_length == int(implementation["Maximum PDU length received"])
        accepted |= {
            (str(c.abstract_syntax), str(c.transfer_syntax[0])) for c in assoc.accepted_contexts if c.context_id != 1
        }
        assoc.release()
    return accepted


def known_sop_classes() -> list[str]:
    """Every SOP class UID pydicom knows, plus those in the statement (all are proposed to the SCP)."""
    known = [uid for uid, entry in UID_dictionary.items() if "SOP Class" in entry[1]]
    return list(dict.fromkeys([*known, *uids("scp-sop-classes", "SOP Class UID")]))


def known_transfer_syntaxes() -> list[str]:
    return [uid for uid, entry in UID_dictionary.items() if entry[1] == "Transfer Syntax"]


# ---- SCP ----------------------------------------------------------------------------------------


def test_scp_accepts_exactly_the_documented_sop_classes(node: Node) -> None:
    documented = uids("scp-sop-classes", "SOP Class UID", "implemented")
    assert len(documented) == len(set(documented)), "a SOP class is listed twice"
    proposed = known_sop_classes()
    accepted = {abstract for abstract, _ in negotiate(node, [(uid, "1.2.840.10008.1.2") for uid in proposed])}
    assert accepted == set(documented), (
        f"accepted but not documented: {sorted(accepted - set(documented))}; "
        f"documented but refused: {sorted(set(documented) - accepted)}"
    )
    planned = set(uids("scp-sop-classes", "SOP Class UID", "planned"))
    assert not planned & accepted


def test_scp_accepts_exactly_the_documented_transfer_syntaxes(node: Node) -> None:
    storage_ts = uids("scp-transfer-syntaxes", "Transfer Syntax UID")
    verification_ts = uids("scp-verification-transfer-syntaxes", "Transfer Syntax UID")
    commitment_ts = uids("scp-commitment-transfer-syntaxes", "Transfer Syntax UID")
    everything = known_transfer_syntaxes()
    assert {*storage_ts, *verification_ts, *commitment_ts} <= set(everything)
    # Every known transfer syntax, for the classes the node synthesises from, for Verification and for
    # Storage Commitment.
    probes = ["1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.5.1.4.1.1.7"]
    non_storage = [Verification, StorageCommitmentPushModel]
    accepted = negotiate(node, [(cls, ts) for cls in [*probes, *non_storage] for ts in everything])
    for cls in probes:
        assert {ts for c, ts in accepted if c == cls} == set(storage_ts), cls
    assert {ts for c, ts in accepted if c == Verification} == set(verification_ts)
    assert {ts for c, ts in accepted if c == StorageCommitmentPushModel} == set(commitment_ts)
    # The documented ones (and one more) for every documented storage class.
    classes = [uid for uid in uids("scp-sop-classes", "SOP Class UID", "implemented") if uid not in non_storage]
    extra = "1.2.840.10008.1.2.4.201"  # HTJ2K Lossless: not documented, so it must be refused
    accepted = negotiate(node, [(cls, ts) for cls in classes for ts in [*storage_ts, extra]])
    for cls in classes:
        assert {ts for c, ts in accepted if c == cls} == set(storage_ts), cls


def test_scp_takes_storage_commitment_reports_only(node: Node) -> None:
    """Storage Commitment is accepted with the peer in the SCP role (role selection, PS3.4 J.3.3), so
    it can send its N-EVENT-REPORT; an N-ACTION (asking the node to commit) gets Processing Failure."""
    row = next(r for r in rows("scp-sop-classes") if r["SOP Class UID"] == StorageCommitmentPushModel)
    assert row["Status"] == "implemented" and "role selection" in row["Role"]
    ae = AE(ae_title=CALLING)
    ae.add_requested_context(StorageCommitmentPushModel)
    role = build_role(StorageCommitmentPushModel, scu_role=False, scp_role=True)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.settings.node.ae_title, ext_neg=[role])
    assert assoc.is_established
    (context,) = assoc.accepted_contexts
    assert context.as_scp and not context.as_scu, "the requestor's SCP role was not accepted"
    assoc.release()
    ae = AE(ae_title=CALLING)
    ae.add_requested_context(StorageCommitmentPushModel)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.settings.node.ae_title)
    assert assoc.is_established
    try:
        request = commitment.action_request("1.2.3.4", [("1.2.840.10008.5.1.4.1.1.7", "1.2.3.4.5")])
        status, _ = assoc.send_n_action(
            request, commitment.REQUEST_COMMITMENT, StorageCommitmentPushModel, commitment.STORAGE_COMMITMENT_INSTANCE
        )
    finally:
        assoc.release()
    assert int(status.Status) == 0x0110
    assert "N-ACTION with 0x0110" in STATEMENT.read_text()


# ---- SCU ----------------------------------------------------------------------------------------


def proposed(contexts: list[PresentationContext]) -> dict[str, list[list[str]]]:
    by_class: dict[str, list[list[str]]] = {}
    for context in contexts:
        by_class.setdefault(str(context.abstract_syntax), []).append([str(ts) for ts in context.transfer_syntax])
    return by_class


def scu_row(sop_class: str) -> dict[str, str]:
    (row,) = [row for row in rows("scu-sop-classes") if row["SOP Class UID"] == sop_class]
    return row


def test_scu_proposes_the_documented_contexts(recorder: tuple) -> None:
    peer, proposals = recorder
    exercised = set()
    assert echo(peer, CALLING) == 0x0000
    row = scu_row(Verification)
    assert row["Status"] == "implemented"
    assert proposed(proposals[-1]) == {Verification: [row["Transfer syntaxes proposed"].split(", ")]}
    exercised.add(Verification)
    for sop_class, build in WRITERS.items():
        results = send(peer, CALLING, build())
        assert results and all(result.succeeded for result in results)
        row = scu_row(sop_class)
        assert row["Status"] == "implemented", f"{sop_class} is sent: its SCU row must say implemented"
        assert proposed(proposals[-1]) == {sop_class: [row["Transfer syntaxes proposed"].split(", ")]}
        exercised.add(sop_class)
    # Storage Commitment: the N-ACTION after a delivery, on an association of its own, without role selection.
    request = commitment.action_request("1.2.3.4", [("1.2.840.10008.5.1.4.1.1.7", "1.2.3.4.5")])
    assert commitment.send_action(peer, CALLING, request, wait_s=0) is None
    row = scu_row(StorageCommitmentPushModel)
    assert row["Status"] == "implemented"
    (context,) = proposals[-1]
    assert proposed([context]) == {StorageCommitmentPushModel: [row["Transfer syntaxes proposed"].split(", ")]}
    assert context.scu_role is None and context.scp_role is None, "the SCU proposed role selection"
    exercised.add(StorageCommitmentPushModel)
    implemented = set(uids("scu-sop-classes", "SOP Class UID", "implemented"))
    assert implemented == exercised, f"documented but not exercised here: {sorted(implemented - exercised)}"


# ---- writers ------------------------------------------------------------------------------------


def test_written_objects_are_the_documented_ones() -> None:
    documented = {row["SOP Class UID"]: row for row in rows("written-objects", "implemented")}
    assert set(documented) == set(WRITERS), "a writer is missing from the statement or from WRITERS"
    implementation = {row["Item"]: row["Value"] for row in rows("implementation")}
    for sop_class, build in WRITERS.items():
        row = documented[sop_class]
        module, _, function = row["Writer"].rpartition(".")
        assert callable(getattr(import_module(module), function)), row["Writer"]
        assert function in build.__code__.co_names, f"WRITERS builds {sop_class} without {row['Writer']}"
        for ds in map(written, build()):
            assert ds.SOPClassUID == sop_class
            assert ds.file_meta.TransferSyntaxUID == row["Transfer Syntax UID"]
            assert ds.file_meta.ImplementationClassUID == implementation["File Meta Implementation Class UID"]
    planned = set(uids("written-objects", "SOP Class UID", "planned"))
    assert not planned & set(WRITERS)


def annex_sources(tmp_path: Path) -> dict[str, Dataset]:
    """Sources from bare (only what a radiograph must have) to full (every copied module)."""
    minimal = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    keep = {"SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "PixelData", "Rows",
            "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "SamplesPerPixel",
            "PhotometricInterpretation"}  # fmt: skip
    for keyword in set(minimal.dir()) - keep:
        delattr(minimal, keyword)
    return {
        "minimal": minimal,
        "RG1_UNCR": pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm")),
        "full": full_cr_source(tmp_path / "full.dcm"),
    }


def element_text(ds: Dataset, keyword: str) -> str:
    value = ds[keyword].value
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value)


def same_value(documented: str, emitted: str) -> bool:
    try:
        return float(documented) == float(emitted)
    except ValueError:
        return documented == emitted


def documented_fixed_value(source: str) -> str | None:
    """The value a ``fixed: VALUE`` or ``configured: `key` (VALUE)`` source names, if it names one."""
    if source.startswith("fixed: "):
        return source.removeprefix("fixed: ").split(" (")[0]
    found = re.fullmatch(r"configured: `([a-z_]+)\.([a-z_]+)` \((.+)\)", source)
    if found:
        assert found[1] == "output" and same_value(found[3], str(getattr(OUTPUT, found[2]))), source
        return found[3]
    return None


@pytest.mark.parametrize("sop_class", list(ANNEXES))
def test_attribute_annex_matches_what_the_writer_emits(tmp_path: Path, sop_class: str) -> None:
    table = rows(ANNEXES[sop_class])
    documented = {row["Attribute"]: row for row in table}
    assert len(documented) == len(table), "an attribute is listed twice"
    for keyword, row in documented.items():
        tag = tag_for_keyword(keyword)
        assert tag is not None, keyword
        assert row["Tag"] == f"({tag >> 16:04X},{tag & 0xFFFF:04X})", keyword
        assert row["Presence"] == "always" or row["Presence"].startswith("conditional"), keyword
    always = {keyword for keyword, row in documented.items() if row["Presence"] == "always"}
    seen: set[str] = set()
    for name, source in annex_sources(tmp_path).items():
        for ds in map(written, WRITERS[sop_class](source)):
            assert ds.SOPClassUID == sop_class
            emitted = {element.keyword for element in ds}
            seen |= emitted
            assert emitted <= set(documented), f"{name}: not in the annex: {sorted(emitted - set(documented))}"
            assert always <= emitted, f"{name}: documented as always but missing: {sorted(always - emitted)}"
            for keyword in always:
                value = documented_fixed_value(documented[keyword]["Source"])
                if value is not None and ds[keyword].VR != "SQ":
                    assert same_value(value, element_text(ds, keyword)), f"{name}: {keyword} is {ds[keyword].value!r}"
    # A conditional row is one the writer really emits for some source (InstitutionName: given to it only).
    unseen = {k for k, row in documented.items() if k not in seen and "given to the writer" not in row["Presence"]}
    assert not unseen, f"documented but never emitted: {sorted(unseen)}"


def test_window_rule_is_the_one_documented() -> None:
    text = " ".join(STATEMENT.read_text().split())
    low, high = voi_window.BODY_PERCENTILES
    assert f"within {voi_window.BACKGROUND_FRACTION * 100:g} % of the view's range" in text
    assert f"the window spans the {low:g}th to the {high:g}th percentile" in text


# ---- configuration ------------------------------------------------------------------------------


def documented_value(text: str) -> object:
    return {"true": True, "false": False, "none": None, "[]": (), "(empty)": ""}.get(text, text)


def test_configuration_table_names_real_keys_with_their_defaults(tmp_path: Path) -> None:
    # The built-in defaults (config.py), not a site file.
    defaults = {
        "node": NodeSettings(storage_dir=tmp_path),
        "security": SecuritySettings(),
        "output": OutputSettings(),
        "scheduler": SchedulerSettings(),
        "loop_prevention": LoopPreventionSettings(),
        "engine": EngineSettings(model=tmp_path),
        "peers": PeerSettings(name="p", ae_title="P", host="127.0.0.1", port=104),  # a [[peers]] table
        "rules": Rule(name="r", azimuths=(30.0,)),  # a [[rules]] table
    }
    for row in rows("configuration"):
        section, _, key = row["Key"].strip("`").partition(".")
        value = getattr(defaults[section], key)
        expected = documented_value(row["Default"])
        if isinstance(value, bool | tuple) or value is None:
            assert value == expected, row["Key"]
        elif isinstance(value, int | float):
            assert value == float(str(expected)), row["Key"]
        else:
            assert str(value) == expected, row["Key"]
    # Every `section.key` the statement mentions anywhere is a real setting, and has a row.
    documented = {row["Key"].strip("`") for row in rows("configuration")}
    mentioned = set(re.findall(r"`([a-z_]+\.[a-z_]+)`", STATEMENT.read_text()))
    for name in mentioned:
        section, _, key = name.partition(".")
        assert hasattr(defaults[section], key), name
    missing = sorted(mentioned - documented)
    assert not missing, f"named in the text, not in the configuration table: {missing}"


# ---- association policy and C-STORE statuses ----------------------------------------------------


def leading_number(cell: str) -> int:
    return int(cell.split()[0])


def associate(node: Node, calling: str, called: str, from_host: str = "127.0.0.1"):  # noqa: ANN201 - an Association
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", node.port, ae_title=called, bind_address=(from_host, 0))


def raw_request(node: Node, calling: bytes, called: bytes) -> tuple[int, int, int]:
    """(result, source, reason) of the A-ASSOCIATE-RJ answering a bare A-ASSOCIATE-RQ (PS3.8 9.3.2)
    with these AE title fields, sent on a plain socket (pynetdicom would not send invalid titles)."""
    body = struct.pack(">HH", 1, 0) + called.ljust(16)[:16] + calling.ljust(16)[:16] + bytes(32)
    with socket.create_connection(("127.0.0.1", node.port), timeout=5) as sock:
        sock.sendall(struct.pack(">BBL", 0x01, 0, len(body)) + body)
        answer = b""
        while len(answer) < 10 and (chunk := sock.recv(10 - len(answer))):
            answer += chunk
    assert answer[:1] == b"\x03", f"not an A-ASSOCIATE-RJ: {answer!r}"
    return answer[7], answer[8], answer[9]


def serving(node: Node) -> int:
    """The associations the node's SCP still runs on either path (which the per-peer cap counts)."""
    general = [assoc for assoc in node.scp._ae.active_associations if assoc.is_acceptor and assoc.is_alive()]
    return len(general) + node.scp.direct.count()


def request_with(node: Node, replace: tuple[bytes, bytes] | None = None, version: int = 1) -> tuple[int, int, int]:
    """(result, source, reason) answering pynetdicom's own A-ASSOCIATE-RQ for Verification, with its
    Protocol Version field set to ``version`` and the bytes ``replace[0]`` replaced by ``replace[1]``."""
    pdu = bytearray(association_request())
    pdu[6:8] = struct.pack(">H", version)
    if replace is not None:
        old, new = replace
        assert len(old) == len(new) and old in pdu
        pdu = bytearray(bytes(pdu).replace(old, new))
    with socket.create_connection(("127.0.0.1", node.port), timeout=5) as sock:
        sock.sendall(pdu)
        answer = read_pdu(sock)
    assert answer[:1] == b"\x03", f"not an A-ASSOCIATE-RJ: {answer!r}"
    return answer[7], answer[8], answer[9]


def associate_until_answered(node: Node, calling: str, called: str, from_host: str, tries: int = 3):  # noqa: ANN201
    """``associate``, again while the attempt ends neither accepted nor rejected: on a loaded machine
    the client's request can miss the node's request timeout or its own ACSE timeout (an abort)."""
    for _ in range(tries - 1):
        assoc = associate(node, calling, called, from_host)
        if assoc.is_established or assoc.is_rejected:
            return assoc
    return associate(node, calling, called, from_host)


def rejection(assoc) -> tuple[int, int, int]:  # noqa: ANN001 - a pynetdicom Association
    assert assoc.is_rejected
    rj = assoc.acceptor.primitive
    return rj.result, rj.result_source, rj.diagnostic


def test_association_rejections_are_the_documented_ones(node: Node) -> None:
    table = rows("association-rejections")
    expected = [tuple(leading_number(row[c]) for c in ("Result", "Source", "Reason/Diag.")) for row in table]
    ours = node.settings.node.ae_title
    allowed = node.settings.security.allowed_calling_ae_titles
    assert allowed and "INTRUDER" not in allowed and node.settings.security.require_called_ae_title
    per_peer, limit = node.settings.node.max_associations_per_peer, node.settings.node.max_associations
    assert 0 < per_peer < limit, "the defaults the statement gives: a per-peer cap below the overall limit"

    def over_the_cap(hosts: list[str], extra_from: str, reason: str) -> tuple[int, int, int]:
        wait_until(lambda: not serving(node))  # earlier associations' threads have ended
        held = [associate(node, CALLING, ours, host) for host in hosts]
        try:
            assert all(assoc.is_established for assoc in held)
            rejected = rejection(associate_until_answered(node, CALLING, ours, extra_from))
            if reason:  # the node records why (after answering, so wait for the row)
                wait_until(lambda: any(reason in (row.reason or "") for row in node.associations()))
            return rejected
        finally:
            for assoc in held:
                assoc.release()

    # One probe per row, in the table's order; the conditions say which is which.
    probes = {
        "not in `security.allowed_calling_ae_titles`": lambda: rejection(associate(node, "INTRUDER", ours)),
        "Called AE Title is not `node.ae_title`": lambda: rejection(associate(node, CALLING, "NOT" + ours)),
        "Calling AE Title field holds control": lambda: raw_request(node, b"EVIL\x1b[2J", ours.encode()),
        "Called AE Title field holds control": lambda: raw_request(node, CALLING.encode(), b"SVDRR\\X"),
        "Application Context Name is not": lambda: request_with(
            node, (b"1.2.840.10008.3.1.1.1", b"1.2.840.10008.3.1.1.9")
        ),
        "Protocol Version without bit 0": lambda: request_with(node, version=2),
        "`node.max_associations_per_peer`": lambda: over_the_cap(
            ["127.0.0.1"] * per_peer, "127.0.0.1", f"more than {per_peer} associations at once from 127.0.0.1"
        ),
        # from distinct loopback addresses, each within its cap, up to the overall limit; then a new address
        "`node.max_associations` associations": lambda: over_the_cap(
            [f"127.0.0.{2 + i // per_peer}" for i in range(limit)], "127.0.0.99", ""
        ),
    }
    seen = []
    for row in table:
        (probe,) = [probe for condition, probe in probes.items() if condition in row["Condition"]]
        seen.append(probe())
    assert len(table) == len(probes)
    assert seen == expected


def test_silent_connections_are_closed_after_the_request_timeout(tmp_path: Path) -> None:
    text = " ".join(STATEMENT.read_text().split())
    assert "`node.request_timeout_s` (default 5 s) is closed without an answer" in text
    with node_factory(tmp_path) as start:
        node = start(node="request_timeout_s = 0.5")
        with socket.create_connection(("127.0.0.1", node.port), timeout=10) as sock:
            opened = time.monotonic()
            assert sock.recv(16) == b"", "the node answered a connection that never asked"
            waited = time.monotonic() - opened
        assert 0.4 <= waited < 5, waited
        # the silent connection never took an association slot
        assert not node.associations()


def docstring_statuses() -> set[int]:
    """The status codes of the table in dicomnode.scp's docstring."""
    return {int(code, 16) for code in re.findall(r"^(0x[0-9A-F]{4}) ", scp.__doc__ or "", re.MULTILINE)}


def test_c_store_statuses_are_the_scp_s() -> None:
    documented = {int(row["Status"], 16) for row in rows("c-store-statuses")}
    # The SCP's own (success, duplicate) and every failure status of the checks it runs.
    checks = {v for k, v in vars(dataset_checks).items() if k.isupper() and isinstance(v, int) and 0 <= v <= 0xFFFF
              and k != "ERROR_COMMENT_MAX"}  # fmt: skip
    ours = {v for k, v in vars(scp).items() if k.isupper() and isinstance(v, int) and 0 <= v <= 0xFFFF
            and k != "ERROR_COMMENT_MAX"}  # fmt: skip
    assert {scp.SUCCESS, scp.DUPLICATE_SOP_INSTANCE} <= ours
    assert documented == checks | ours, (
        f"in the code, not in the statement: {sorted(map(hex, (checks | ours) - documented))}; "
        f"in the statement, not in the code: {sorted(map(hex, documented - checks - ours))}"
    )
    assert documented == docstring_statuses(), "dicomnode.scp's docstring and the statement list other statuses"


def cr_without(node_study: str, **changes: object) -> Dataset:
    """RG1_UNCR in a new study with ``changes`` made (None deletes), invalid values included."""
    ds = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    ds.StudyInstanceUID = node_study
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid UID this test sends on purpose
        for keyword, value in changes.items():
            if value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
    return ds


def test_c_store_failure_statuses_are_answered_as_documented(node: Node) -> None:
    """A few of the documented refusals, sent for real: each gets its status and an Error Comment."""
    documented = {int(row["Status"], 16) for row in rows("c-store-statuses")}
    study = pydicom.uid.generate_uid()
    cases = {
        dataset_checks.NO_PIXEL_DATA: cr_without(study, PixelData=None),
        dataset_checks.PIXEL_DATA_LENGTH: cr_without(study, PixelData=b"\0\0" * 10),
        dataset_checks.INVALID_UID: cr_without(study, SeriesInstanceUID="1.2.abc"),
    }
    ae = AE(ae_title=CALLING)
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1", ["1.2.840.10008.1.2.1"])
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.settings.node.ae_title)
    assert assoc.is_established
    try:
        for code, ds in cases.items():
            assert code in documented
            status = assoc.send_c_store(ds)
            assert int(status.Status) == code, f"0x{code:04X} expected, got 0x{int(status.Status):04X}"
            assert 0 < len(status.ErrorComment) <= dataset_checks.ERROR_COMMENT_MAX
    finally:
        assoc.release()
