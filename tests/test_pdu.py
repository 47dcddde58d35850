"""The direct path's PDU and command-set codec (:mod:`dicomnode.pdu`) against pynetdicom's own.

Requests are built by pynetdicom and parsed here; what :mod:`dicomnode.pdu` encodes is decoded by
pynetdicom and pydicom. Malformed requests are made by hand, item by item (PS3.8 9.3.2), so each
one breaks exactly one rule.
"""

from __future__ import annotations

import struct
from io import BytesIO

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless
from pynetdicom.dsutils import decode, encode
from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ, A_RELEASE_RP, P_DATA_TF
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
    UserIdentityNegotiation,
)
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from dicomnode import pdu
from tests.dicom_nodes import AE_TITLE, CALLING
from tests.raw_dicom import association_request

IMPLEMENTATION_UID = "1.2.826.0.1.3680043.9.3811.1"


def pynetdicom_request(*extra: SCP_SCU_RoleSelectionNegotiation | UserIdentityNegotiation) -> bytes:
    """An A-ASSOCIATE-RQ PDU encoded by pynetdicom: CT (two syntaxes) and Verification, version name."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = pdu.APPLICATION_CONTEXT
    primitive.calling_ae_title = CALLING
    primitive.called_ae_title = AE_TITLE
    proposed = []
    proposals: list[tuple[str, list[str | UID]]] = [
        (CTImageStorage, [JPEG2000Lossless, ExplicitVRLittleEndian]),
        (Verification, [ImplicitVRLittleEndian]),
    ]
    for i, (abstract, syntaxes) in enumerate(proposals):
        context = build_context(abstract, syntaxes)
        context.context_id = 2 * i + 1
        proposed.append(context)
    primitive.presentation_context_definition_list = proposed
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = 28672
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = IMPLEMENTATION_UID
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = "PYNETDICOM_304"
    primitive.user_information = [maximum, implementation, version, *extra]
    request = A_ASSOCIATE_RQ()
    request.from_primitive(primitive)
    return bytes(request.encode())


# ---- Hand-made requests: one broken rule each -------------------------------------------------------


def item(kind: int, value: bytes) -> bytes:
    """An item of a PDU's variable field: type, reserved, 16-bit big-endian length (PS3.8 9.3.2)."""
    return struct.pack(">BBH", kind, 0, len(value)) + value


def context_item(context_id: int, abstract: str = Verification, syntax: str = ImplicitVRLittleEndian) -> bytes:
    return item(0x20, bytes((context_id, 0, 0, 0)) + item(0x30, abstract.encode()) + item(0x40, syntax.encode()))


APPLICATION = item(0x10, pdu.APPLICATION_CONTEXT.encode())
USER = item(0x50, item(0x51, struct.pack(">L", 16384)) + item(0x52, IMPLEMENTATION_UID.encode()))


def request_body(*items: bytes, version: int = 1) -> bytes:
    """The part of an A-ASSOCIATE-RQ after its 6-byte header, with ``items`` as its variable field."""
    fixed = struct.pack(">HH", version, 0) + AE_TITLE.encode().ljust(16) + CALLING.encode().ljust(16) + bytes(32)
    return fixed + b"".join(items)


def test_the_hand_made_request_parses() -> None:
    request = pdu.parse_associate_rq(request_body(APPLICATION, context_item(1), USER))
    assert [(c.id, c.abstract_syntax, c.transfer_syntaxes) for c in request.contexts] == [
        (1, Verification, [ImplicitVRLittleEndian])
    ]
    assert request.max_pdu == 16384 and request.plain


# ---- A-ASSOCIATE-RQ ----------------------------------------------------------------------------------


def test_the_raw_test_clients_request_parses_to_its_context_titles_and_maximum() -> None:
    raw = association_request()
    assert raw[0] == pdu.A_ASSOCIATE_RQ and struct.unpack(">L", raw[2:6])[0] == len(raw) - 6
    request = pdu.parse_associate_rq(raw[6:])
    assert (request.protocol_version, request.called_ae, request.calling_ae) == (1, AE_TITLE, CALLING)
    assert request.application_context == pdu.APPLICATION_CONTEXT
    (context,) = request.contexts
    assert (context.id, context.abstract_syntax) == (1, Verification)
    assert context.transfer_syntaxes[:2] == [ImplicitVRLittleEndian, ExplicitVRLittleEndian]
    assert request.max_pdu == 16382
    assert request.implementation_class_uid == IMPLEMENTATION_UID and request.implementation_version == ""
    assert request.user_items == {pdu.MAXIMUM_LENGTH, pdu.IMPLEMENTATION_CLASS_UID} and request.plain


def test_a_pynetdicom_request_with_several_contexts_parses_in_order_with_its_version_name() -> None:
    raw = pynetdicom_request()
    request = pdu.parse_associate_rq(memoryview(raw)[6:])
    assert [(c.id, c.abstract_syntax, c.transfer_syntaxes) for c in request.contexts] == [
        (1, CTImageStorage, [JPEG2000Lossless, ExplicitVRLittleEndian]),
        (3, Verification, [ImplicitVRLittleEndian]),
    ]
    assert request.max_pdu == 28672
    assert request.implementation_version == "PYNETDICOM_304"
    assert request.user_items == {0x51, 0x52, 0x55} and request.plain


def test_role_selection_or_user_identity_make_a_request_not_plain() -> None:
    role = SCP_SCU_RoleSelectionNegotiation()
    role.sop_class_uid = CTImageStorage
    role.scu_role, role.scp_role = True, True
    identity = UserIdentityNegotiation()
    identity.user_identity_type = 1
    identity.primary_field = b"someone"
    for extra, kind in ((role, 0x54), (identity, 0x58)):
        request = pdu.parse_associate_rq(pynetdicom_request(extra)[6:])
        assert kind in request.user_items and not request.plain
        assert len(request.contexts) == 2  # parsed whole all the same


def test_maximum_length_zero_means_unlimited_and_is_kept() -> None:
    user = item(0x50, item(0x51, bytes(4)))
    assert pdu.parse_associate_rq(request_body(APPLICATION, context_item(1), user)).max_pdu == 0


MALFORMED = {
    "shorter than the fixed fields": (request_body()[:60], "shorter than its fixed fields"),
    "an item header cut short": (request_body(APPLICATION, context_item(1), USER, b"\x50\x00"), "cut short"),
    "the last item cut": (request_body(APPLICATION, context_item(1), USER)[:-3], "longer than its PDU"),
    "an item longer than the PDU": (
        request_body(APPLICATION, context_item(1), b"\x50\x00\x00\xff" + USER[4:]),
        "item 0x50 is longer than its PDU",
    ),
    "a sub-item longer than its item": (
        request_body(APPLICATION, item(0x20, bytes((1, 0, 0, 0)) + b"\x30\x00\x00\x40" + b"1.2"), USER),
        "item 0x30 is longer than its PDU",
    ),
    "an even context id": (request_body(APPLICATION, context_item(2), USER), "odd and unique"),
    "duplicate context ids": (request_body(APPLICATION, context_item(1), context_item(1), USER), "odd and unique"),
    "no application context": (request_body(context_item(1), USER), "without an application context"),
    "no presentation context": (request_body(APPLICATION, USER), "without a presentation context"),
    "a presentation context item of 3 bytes": (
        request_body(APPLICATION, item(0x20, b"\x01\x00\x00"), USER),
        "too short",
    ),
    "a maximum length of 2 bytes": (
        request_body(APPLICATION, context_item(1), item(0x50, item(0x51, b"\x40\x00"))),
        "not 4 bytes",
    ),
}


@pytest.mark.parametrize("name", MALFORMED)
def test_a_malformed_request_raises_pdu_error_with_an_invalid_parameter_reason(name: str) -> None:
    body, message = MALFORMED[name]
    with pytest.raises(pdu.PduError, match=message) as raised:
        pdu.parse_associate_rq(body)
    assert raised.value.reason == pdu.INVALID_PDU_PARAMETER


@pytest.mark.parametrize(
    "body",
    [
        request_body(APPLICATION, context_item(1), USER, item(0x33, b"1.2.3")),  # unknown item type
        request_body(APPLICATION, context_item(1), item(0x21, bytes(4)), USER),  # an AC's context item in an RQ
        request_body(APPLICATION, item(0x20, bytes((1, 0, 0, 0)) + item(0x41, b"1.2")), USER),  # unknown sub-item
    ],
    ids=["unknown item", "AC context item", "unknown context sub-item"],
)
def test_an_unknown_item_raises_pdu_error_with_an_unrecognized_parameter_reason(body: bytes) -> None:
    with pytest.raises(pdu.PduError, match="unknown") as raised:
        pdu.parse_associate_rq(body)
    assert raised.value.reason == pdu.UNRECOGNIZED_PDU_PARAMETER


# ---- A-ASSOCIATE-AC, -RJ, A-RELEASE-RP, A-ABORT ------------------------------------------------------


def test_associate_ac_decodes_with_pynetdicom_to_the_same_results() -> None:
    request = pdu.parse_associate_rq(pynetdicom_request()[6:])
    results = [(1, pdu.ACCEPTANCE, ExplicitVRLittleEndian), (3, pdu.ABSTRACT_SYNTAX_NOT_SUPPORTED, ""), (5, 4, "")]
    raw = pdu.associate_ac(request, results, 65536, "1.2.826.0.1.3680043.10.1", "DICOMNODE_1")
    assert raw[0] == pdu.A_ASSOCIATE_AC and struct.unpack(">L", raw[2:6])[0] == len(raw) - 6
    ac = A_ASSOCIATE_AC()
    ac.decode(raw)
    assert ac.protocol_version == 1 and ac.application_context_name == pdu.APPLICATION_CONTEXT
    # PS3.8 Table 9-17: the AE title fields echo the request's
    assert (ac.called_ae_title, ac.calling_ae_title) == (AE_TITLE, CALLING)
    contexts = ac.to_primitive().presentation_context_definition_results_list
    decoded = [(c.context_id, c.result, c.transfer_syntax) for c in contexts]
    assert decoded == [(1, 0, [ExplicitVRLittleEndian]), (3, 3, []), (5, 4, [])]
    user = ac.user_information
    assert user is not None and user.maximum_length == 65536
    assert user.implementation_class_uid == "1.2.826.0.1.3680043.10.1"
    assert user.implementation_version_name == "DICOMNODE_1"


def test_associate_ac_without_a_version_name_leaves_the_sub_item_out() -> None:
    request = pdu.parse_associate_rq(association_request()[6:])
    ac = A_ASSOCIATE_AC()
    ac.decode(pdu.associate_ac(request, [(1, 0, ImplicitVRLittleEndian)], 16384, IMPLEMENTATION_UID, ""))
    assert ac.user_information is not None and ac.user_information.implementation_version_name is None


def test_rejection_release_and_abort_pdus_are_pynetdicoms() -> None:
    raw = pdu.associate_rj(1, 1, 7)
    assert raw == b"\x03\x00\x00\x00\x00\x04\x00\x01\x01\x07"
    rj = A_ASSOCIATE_RJ()
    rj.decode(raw)
    assert (rj.result, rj.source, rj.reason_diagnostic) == (1, 1, 7)
    rp = A_RELEASE_RP()
    rp.decode(pdu.RELEASE_RP)
    assert pdu.RELEASE_RP == bytes(rp.encode()) == b"\x06\x00\x00\x00\x00\x04\x00\x00\x00\x00"
    abort = A_ABORT_RQ()
    abort.decode(pdu.abort(2, pdu.UNEXPECTED_PDU))
    assert (abort.source, abort.reason_diagnostic) == (2, 2)


# ---- P-DATA-TF ----------------------------------------------------------------------------------------


def pdvs(pdus: list[bytes]) -> list[tuple[int, int, bytes, int]]:
    """(context id, control header, fragment, PDU variable length) of each PDU's one PDV, via pynetdicom."""
    out = []
    for raw in pdus:
        decoded = P_DATA_TF()
        decoded.decode(raw)
        (value,) = decoded.presentation_data_value_items
        assert value.presentation_context_id is not None and value.presentation_data_value is not None
        control, fragment = value.presentation_data_value[0], value.presentation_data_value[1:]
        out.append((value.presentation_context_id, control, fragment, len(raw) - 6))
    return out


@pytest.mark.parametrize("command", [True, False])
def test_p_data_splits_a_payload_within_the_peers_maximum(command: bool) -> None:
    payload = bytes(range(256)) * 40 + b"tail"  # 10,244 bytes
    values = pdvs(pdu.p_data(5, payload, command, 4096))
    assert len(values) == 3
    assert all(context == 5 and length <= 4096 for context, _, _, length in values)
    assert values[0][3] == 4096  # full PDUs use all the room the maximum gives
    assert b"".join(fragment for _, _, fragment, _ in values) == payload
    bit = 0x01 if command else 0x00
    assert [control for _, control, _, _ in values] == [bit, bit, bit | 0x02]


def test_p_data_at_an_exact_multiple_sends_no_empty_last_fragment() -> None:
    values = pdvs(pdu.p_data(1, bytes(2 * 4090), False, 4096))
    assert [(len(fragment), control) for _, control, fragment, _ in values] == [(4090, 0x00), (4090, 0x02)]


def test_p_data_without_a_maximum_and_with_an_empty_payload_sends_one_pdu() -> None:
    assert [(c, f) for _, c, f, _ in pdvs(pdu.p_data(3, bytes(200_000), True, 0))] == [(0x03, bytes(200_000))]
    assert [(c, f) for _, c, f, _ in pdvs(pdu.p_data(3, b"", False, 4096))] == [(0x02, b"")]


# ---- Command sets ---------------------------------------------------------------------------------------


C_STORE_RSP = {
    pdu.AFFECTED_SOP_CLASS: CTImageStorage,  # 25 characters: padded with NUL
    pdu.COMMAND_FIELD: 0x8001,
    0x0120: 7,
    pdu.DATA_SET_TYPE: pdu.NO_DATA_SET,
    0x0900: 0xC213,
    pdu.AFFECTED_SOP_INSTANCE: "1.2.3.4.5",
    0x0902: "odd comment",  # LO: padded with a space
}


def test_encode_command_decodes_with_pydicom_with_its_group_length_and_padding() -> None:
    raw = pdu.encode_command(C_STORE_RSP)
    assert len(raw) % 2 == 0
    ds = decode(BytesIO(raw), True, True)
    assert ds.CommandGroupLength == len(raw) - 12  # everything after the group length element
    assert (ds.CommandField, ds.MessageIDBeingRespondedTo, ds.CommandDataSetType, ds.Status) == (
        0x8001,
        7,
        0x0101,
        0xC213,
    )
    assert ds.AffectedSOPClassUID == CTImageStorage and ds.AffectedSOPInstanceUID == "1.2.3.4.5"
    assert ds.ErrorComment == "odd comment"
    assert [e.tag for e in ds] == sorted(e.tag for e in ds)  # ascending, as PS3.5 7.1 requires
    elements = pdu.parse_command(raw)
    assert elements[pdu.AFFECTED_SOP_CLASS] == CTImageStorage.encode() + b"\x00"
    assert elements[pdu.AFFECTED_SOP_INSTANCE] == b"1.2.3.4.5\x00"
    assert elements[0x0902] == b"odd comment "


def test_encode_and_parse_command_round_trip() -> None:
    elements = pdu.parse_command(pdu.encode_command(C_STORE_RSP))
    assert struct.unpack("<L", elements[0x0000])[0] == sum(8 + len(v) for k, v in elements.items() if k)
    for element, value in C_STORE_RSP.items():
        if isinstance(value, int):
            assert pdu.command_us(elements, element) == value
        elif element in pdu.UI_TAGS:
            assert pdu.command_ui(elements, element) == value
    assert pdu.command_us(elements, 0x0000) is None  # UL, not US
    assert pdu.command_us(elements, 0x0700) is None and pdu.command_ui(elements, 0x1001) == ""


def test_parse_command_reads_a_pynetdicom_encoded_c_store_request() -> None:
    command = Dataset()
    command.AffectedSOPClassUID = CTImageStorage
    command.CommandField = 0x0001
    command.MessageID = 12
    command.Priority = 0
    command.CommandDataSetType = 0x0000
    command.AffectedSOPInstanceUID = "1.2.3"
    body = encode(command, True, True)
    assert body is not None
    group = Dataset()
    group.CommandGroupLength = len(body)
    raw = (encode(group, True, True) or b"") + body
    elements = pdu.parse_command(raw)
    assert pdu.command_us(elements, pdu.COMMAND_FIELD) == 0x0001
    assert pdu.command_us(elements, pdu.MESSAGE_ID) == 12
    assert pdu.command_us(elements, pdu.DATA_SET_TYPE) == 0x0000
    assert pdu.command_ui(elements, pdu.AFFECTED_SOP_CLASS) == CTImageStorage
    assert pdu.command_ui(elements, pdu.AFFECTED_SOP_INSTANCE) == "1.2.3"


@pytest.mark.parametrize(
    "raw",
    [
        pdu.encode_command({pdu.COMMAND_FIELD: 1})[:-1],  # cut inside the last value
        pdu.encode_command({pdu.COMMAND_FIELD: 1}) + b"\x00\x00\x10",  # cut inside an element header
        struct.pack("<HHL", 0x0008, 0x0018, 2) + b"1\x00",  # an element outside group 0000
    ],
    ids=["value cut", "header cut", "group 0008"],
)
def test_a_malformed_command_set_raises_pdu_error(raw: bytes) -> None:
    with pytest.raises(pdu.PduError):
        pdu.parse_command(raw)
