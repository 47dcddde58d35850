"""docs/conformance-statement.md cannot drift from the code: its tables are checked against what a
real StorageSCP negotiates, what the SCU proposes on real associations and what the writers emit.

Tables are the Markdown tables that follow a ``<!-- table: NAME -->`` line. Rows whose Status is
``implemented`` must match the code exactly; ``planned`` rows must not be in the code yet (switch
the row when the feature lands, and add its writer to :data:`WRITERS`).
"""

from __future__ import annotations

import io
import re
import threading
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
from pynetdicom import AE, AllStoragePresentationContexts, build_context, evt
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicomnode.config import (
    LoopPreventionSettings,
    NodeSettings,
    OutputSettings,
    PeerSettings,
    SchedulerSettings,
    SecuritySettings,
)
from dicomnode.derived import GeneratorInfo, build_derived_instances
from dicomnode.scu import echo, send
from tests.dicom_nodes import CALLING, Node, node_factory
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
# The lead adds the KOS and multi-frame SC writers here when they are merged.

GENERATOR = GeneratorInfo(model_name="svdrr-test", model_version="1", model_identity="5e" * 32, node_version="0")


def single_frame_sc(source: Dataset | None = None) -> list[Dataset]:
    source = source or pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    pixels = [np.arange(64 * 48, dtype=np.uint16).reshape(64, 48) % 4096 for _ in range(2)]
    return build_derived_instances(
        source, pixels, 12, None, None, [(-30.0, 0.0), (30.0, 0.0)], GENERATOR, seed=0, steps=1,
        guidance_scale=1.0, content_datetime=datetime(2026, 1, 2, 3, 4, 5),
    )  # fmt: skip


WRITERS: dict[str, Callable[[], list[Dataset]]] = {
    "1.2.840.10008.5.1.4.1.1.7": single_frame_sc,
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
    """A pynetdicom SCP accepting storage and verification that records each association's proposal."""
    proposals: list[list[PresentationContext]] = []
    lock = threading.Lock()

    def on_requested(event: evt.Event) -> None:
        with lock:
            proposals.append(list(event.assoc.requestor.requested_contexts))

    ae = AE(ae_title="RECORDER")
    ae.supported_contexts = [*AllStoragePresentationContexts, build_context(Verification)]
    handlers = [(evt.EVT_REQUESTED, on_requested), (evt.EVT_C_STORE, lambda event: 0x0000)]
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
    for start in range(0, len(contexts), MAX_CONTEXTS):
        ae = AE(ae_title=CALLING)
        for abstract_syntax, transfer_syntax in contexts[start : start + MAX_CONTEXTS]:
            ae.add_requested_context(abstract_syntax, [transfer_syntax])
        assoc = ae.associate("127.0.0.1", node.port, ae_title=node.settings.node.ae_title)
        assert assoc.is_established, "the SCP refused an association it should accept"
        acceptor = assoc.acceptor
        assert acceptor.implementation_class_uid == implementation["Implementation Class UID"]
        assert acceptor.implementation_version_name == implementation["Implementation Version Name"]
        assert acceptor.maximum_length == int(implementation["Maximum PDU length received"])
        accepted |= {(str(c.abstract_syntax), str(c.transfer_syntax[0])) for c in assoc.accepted_contexts}
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
    everything = known_transfer_syntaxes()
    assert set(storage_ts) <= set(everything) and set(verification_ts) <= set(everything)
    # Every known transfer syntax, for the classes the node synthesises from, and for Verification.
    probes = ["1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.5.1.4.1.1.7"]
    accepted = negotiate(node, [(cls, ts) for cls in [*probes, Verification] for ts in everything])
    for cls in probes:
        assert {ts for c, ts in accepted if c == cls} == set(storage_ts), cls
    assert {ts for c, ts in accepted if c == Verification} == set(verification_ts)
    # The documented ones (and one more) for every documented storage class.
    classes = [uid for uid in uids("scp-sop-classes", "SOP Class UID", "implemented") if uid != Verification]
    extra = "1.2.840.10008.1.2.4.201"  # HTJ2K Lossless: not documented, so it must be refused
    accepted = negotiate(node, [(cls, ts) for cls in classes for ts in [*storage_ts, extra]])
    for cls in classes:
        assert {ts for c, ts in accepted if c == cls} == set(storage_ts), cls


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
    assert echo(peer, CALLING) == 0x0000
    row = scu_row(Verification)
    assert row["Status"] == "implemented"
    assert proposed(proposals[-1]) == {Verification: [row["Transfer syntaxes proposed"].split(", ")]}
    for sop_class, build in WRITERS.items():
        results = send(peer, CALLING, build())
        assert results and all(result.succeeded for result in results)
        row = scu_row(sop_class)
        assert row["Status"] == "implemented", f"{sop_class} is sent: its SCU row must say implemented"
        assert proposed(proposals[-1]) == {sop_class: [row["Transfer syntaxes proposed"].split(", ")]}


# ---- writers ------------------------------------------------------------------------------------


def test_written_objects_are_the_documented_ones() -> None:
    documented = {row["SOP Class UID"]: row for row in rows("written-objects", "implemented")}
    assert set(documented) == set(WRITERS), "a writer is missing from the statement or from WRITERS"
    implementation = {row["Item"]: row["Value"] for row in rows("implementation")}
    for sop_class, build in WRITERS.items():
        row = documented[sop_class]
        module, _, function = row["Writer"].rpartition(".")
        assert callable(getattr(import_module(module), function)), row["Writer"]
        for ds in map(written, build()):
            assert ds.SOPClassUID == sop_class
            assert ds.file_meta.TransferSyntaxUID == row["Transfer Syntax UID"]
            assert ds.file_meta.ImplementationClassUID == implementation["File Meta Implementation Class UID"]
    planned = set(uids("written-objects", "SOP Class UID", "planned"))
    assert not planned & set(WRITERS)


def test_sc_attribute_annex_matches_what_the_writer_emits(tmp_path: Path) -> None:
    table = rows("sc-attributes")
    documented = {row["Attribute"]: row for row in table}
    for keyword, row in documented.items():
        tag = tag_for_keyword(keyword)
        assert tag is not None, keyword
        assert row["Tag"] == f"({tag >> 16:04X},{tag & 0xFFFF:04X})", keyword
        assert row["Presence"] == "always" or row["Presence"].startswith("conditional"), keyword
    always = {keyword for keyword, row in documented.items() if row["Presence"] == "always"}
    minimal = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    keep = {"SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "PixelData", "Rows",
            "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "SamplesPerPixel",
            "PhotometricInterpretation"}  # fmt: skip
    for keyword in set(minimal.dir()) - keep:
        delattr(minimal, keyword)
    sources = {
        "minimal": minimal,
        "RG1_UNCR": pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm")),
        "full": full_cr_source(tmp_path / "full.dcm"),
    }
    for name, source in sources.items():
        for ds in map(written, single_frame_sc(source)):
            emitted = {element.keyword for element in ds}
            assert emitted <= set(documented), f"{name}: not in the annex: {sorted(emitted - set(documented))}"
            assert always <= emitted, f"{name}: documented as always but missing: {sorted(always - emitted)}"
            assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"


# ---- configuration ------------------------------------------------------------------------------


def documented_value(text: str) -> object:
    return {"true": True, "false": False, "none": None, "[]": ()}.get(text, text)


def test_configuration_table_names_real_keys_with_their_defaults(tmp_path: Path) -> None:
    # The built-in defaults (config.py), not a site file.
    defaults = {
        "node": NodeSettings(storage_dir=tmp_path),
        "security": SecuritySettings(),
        "output": OutputSettings(),
        "scheduler": SchedulerSettings(),
        "loop_prevention": LoopPreventionSettings(),
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
    # Every `section.key` the statement mentions anywhere is a real setting.
    for section, key in re.findall(r"`([a-z_]+)\.([a-z_]+)`", STATEMENT.read_text()):
        assert hasattr(defaults[section], key), f"{section}.{key}"


# ---- association policy and C-STORE statuses ----------------------------------------------------


def leading_number(cell: str) -> int:
    return int(cell.split()[0])


def associate(node: Node, calling: str, called: str):  # noqa: ANN201 - a pynetdicom Association
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", node.port, ae_title=called)


def test_association_rejections_are_the_documented_ones(node: Node) -> None:
    expected = [
        tuple(leading_number(row[column]) for column in ("Result", "Source", "Reason/Diag."))
        for row in rows("association-rejections")
    ]
    ours = node.settings.node.ae_title
    allowed = node.settings.security.allowed_calling_ae_titles
    assert allowed and "INTRUDER" not in allowed and node.settings.security.require_called_ae_title
    seen = []
    for calling, called in (("INTRUDER", ours), (CALLING, "NOT" + ours)):
        assoc = associate(node, calling, called)
        assert assoc.is_rejected
        rj = assoc.acceptor.primitive
        seen.append((rj.result, rj.result_source, rj.diagnostic))
    limit = node.settings.node.max_associations
    held = [associate(node, CALLING, ours) for _ in range(limit)]
    try:
        assert all(assoc.is_established for assoc in held)
        extra = associate(node, CALLING, ours)
        assert extra.is_rejected
        rj = extra.acceptor.primitive
        seen.append((rj.result, rj.result_source, rj.diagnostic))
    finally:
        for assoc in held:
            assoc.release()
    assert seen == expected


def test_c_store_statuses_are_the_scp_s(node: Node) -> None:
    from dicomnode import scp

    documented = {int(row["Status"], 16) for row in rows("c-store-statuses")}
    names = ("SUCCESS", "DUPLICATE_SOP_INSTANCE", "OUT_OF_RESOURCES", "DATA_SET_DOES_NOT_MATCH_SOP_CLASS",
             "CANNOT_UNDERSTAND", "INVALID_UID", "SOP_INSTANCE_MISMATCH")  # fmt: skip
    assert documented == {getattr(scp, name) for name in names}
    status_constants = {v for k, v in vars(scp).items() if k.isupper() and isinstance(v, int) and 0 <= v <= 0xFFFF
                        and k not in ("ERROR_COMMENT_MAX",)}  # fmt: skip
    assert status_constants == documented, "a status constant of dicomnode.scp is not in the statement"
