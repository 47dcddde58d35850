"""The Upper Layer PDUs and DIMSE command sets a storage association needs, encoded and decoded directly.

PS3.8 section 9.3 (PDU structure) and PS3.7 section 9.3 / Annex E (command sets, Implicit VR Little
Endian, group 0000). Used by :mod:`dicomnode.direct_association` to serve plain storage
associations without pynetdicom's threads and copies. Decoding is strict: a malformed PDU raises
:class:`PduError`, which the caller answers with an A-ABORT; nothing here trusts a length it has not
checked against the bytes it was given.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

A_ASSOCIATE_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ = 0x01, 0x02, 0x03
P_DATA_TF, A_RELEASE_RQ, A_RELEASE_RP, A_ABORT = 0x04, 0x05, 0x06, 0x07

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"  # the DICOM Application Context Name (PS3.7 A.2.1)

# Presentation context results (PS3.8 Table 9-18)
ACCEPTANCE, ABSTRACT_SYNTAX_NOT_SUPPORTED, TRANSFER_SYNTAXES_NOT_SUPPORTED = 0, 3, 4

# A-ABORT reasons when the service-provider (source 2) aborts (PS3.8 Table 9-26)
UNRECOGNIZED_PDU, UNEXPECTED_PDU, UNRECOGNIZED_PDU_PARAMETER, INVALID_PDU_PARAMETER = 1, 2, 4, 6

# User Information sub-items (PS3.7 D.3.3) the direct path understands; any other sends the request
# to the general path (role selection, extended negotiation, user identity).
MAXIMUM_LENGTH, IMPLEMENTATION_CLASS_UID, ASYNC_OPERATIONS, IMPLEMENTATION_VERSION = 0x51, 0x52, 0x53, 0x55
PLAIN_USER_ITEMS = frozenset({MAXIMUM_LENGTH, IMPLEMENTATION_CLASS_UID, ASYNC_OPERATIONS, IMPLEMENTATION_VERSION})


class PduError(ValueError):
    """A PDU or command set that does not follow PS3.8 / PS3.7; ``reason`` is the A-ABORT reason."""

    def __init__(self, message: str, reason: int = INVALID_PDU_PARAMETER) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class RequestedContext:
    id: int
    abstract_syntax: str
    transfer_syntaxes: list[str]


@dataclass
class AssociateRequest:
    """An A-ASSOCIATE-RQ PDU's content (PS3.8 9.3.2)."""

    protocol_version: int
    called_ae: str  # without padding
    calling_ae: str
    application_context: str
    contexts: list[RequestedContext] = field(default_factory=list)
    max_pdu: int = 0  # the requestor's maximum P-DATA-TF length; 0: unlimited
    implementation_class_uid: str = ""
    implementation_version: str = ""
    user_items: set[int] = field(default_factory=set)  # the sub-item types present

    @property
    def plain(self) -> bool:
        """Whether it asks nothing but presentation contexts and the usual user information."""
        return self.user_items <= PLAIN_USER_ITEMS


def _uid(raw: bytes | memoryview) -> str:
    return bytes(raw).rstrip(b"\x00 ").decode("ascii", "replace")


def _items(body: bytes | memoryview, start: int) -> list[tuple[int, memoryview]]:
    """The (type, value) items of a variable field: 1-byte type, 1 reserved, 2-byte big-endian length."""
    view = memoryview(body)
    out, i = [], start
    while i < len(view):
        if i + 4 > len(view):
            raise PduError("an item header is cut short")
        kind, length = view[i], struct.unpack_from(">H", view, i + 2)[0]
        if i + 4 + length > len(view):
            raise PduError(f"item 0x{kind:02X} is longer than its PDU")
        out.append((kind, view[i + 4 : i + 4 + length]))
        i += 4 + length
    return out


def parse_associate_rq(body: bytes | memoryview) -> AssociateRequest:
    """Decode the variable part after the 6-byte PDU header of an A-ASSOCIATE-RQ."""
    if len(body) < 68:
        raise PduError("A-ASSOCIATE-RQ shorter than its fixed fields")
    view = memoryview(body)
    (version,) = struct.unpack_from(">H", view, 0)
    request = AssociateRequest(
        protocol_version=version,
        called_ae=bytes(view[4:20]).decode("ascii", "replace").strip(" \x00"),
        calling_ae=bytes(view[20:36]).decode("ascii", "replace").strip(" \x00"),
        application_context="",
    )
    for kind, value in _items(view, 68):
        if kind == 0x10:
            request.application_context = _uid(value)
        elif kind == 0x20:
            if len(value) < 4:
                raise PduError("presentation context item too short")
            abstract, syntaxes = "", []
            for sub, sub_value in _items(value, 4):
                if sub == 0x30:
                    abstract = _uid(sub_value)
                elif sub == 0x40:
                    syntaxes.append(_uid(sub_value))
                else:
                    raise PduError(f"unknown presentation context sub-item 0x{sub:02X}", UNRECOGNIZED_PDU_PARAMETER)
            request.contexts.append(RequestedContext(value[0], abstract, syntaxes))
        elif kind == 0x50:
            for sub, sub_value in _items(value, 0):
                request.user_items.add(sub)
                if sub == MAXIMUM_LENGTH:
                    if len(sub_value) != 4:
                        raise PduError("maximum length sub-item is not 4 bytes")
                    (request.max_pdu,) = struct.unpack(">L", sub_value)
                elif sub == IMPLEMENTATION_CLASS_UID:
                    request.implementation_class_uid = _uid(sub_value)
                elif sub == IMPLEMENTATION_VERSION:
                    request.implementation_version = bytes(sub_value).decode("ascii", "replace").strip()
        else:
            raise PduError(f"unknown A-ASSOCIATE-RQ item 0x{kind:02X}", UNRECOGNIZED_PDU_PARAMETER)
    if not request.application_context:
        raise PduError("A-ASSOCIATE-RQ without an application context")
    if not request.contexts:
        raise PduError("A-ASSOCIATE-RQ without a presentation context")
    ids = [c.id for c in request.contexts]
    if len(set(ids)) != len(ids) or any(i % 2 == 0 for i in ids):
        raise PduError("presentation context IDs must be odd and unique")
    return request


def _item(kind: int, value: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(value)) + value


def _pdu(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBL", kind, 0, len(body)) + body


def _ae_field(title: str) -> bytes:
    return title.encode("ascii", "replace")[:16].ljust(16)


def associate_ac(
    request: AssociateRequest,
    results: list[tuple[int, int, str]],
    max_pdu: int,
    implementation_class_uid: str,
    implementation_version: str,
) -> bytes:
    """An A-ASSOCIATE-AC PDU: ``results`` holds (context id, result, transfer syntax) per context."""
    body = struct.pack(">HH", 1, 0) + _ae_field(request.called_ae) + _ae_field(request.calling_ae) + bytes(32)
    body += _item(0x10, APPLICATION_CONTEXT.encode())
    for context_id, result, syntax in results:
        sub = _item(0x40, syntax.encode()) if syntax else b""
        body += _item(0x21, bytes((context_id, 0, result, 0)) + sub)
    user = _item(MAXIMUM_LENGTH, struct.pack(">L", max_pdu))
    user += _item(IMPLEMENTATION_CLASS_UID, implementation_class_uid.encode())
    if implementation_version:
        user += _item(IMPLEMENTATION_VERSION, implementation_version.encode()[:16])
    body += _item(0x50, user)
    return _pdu(A_ASSOCIATE_AC, body)


def associate_rj(result: int, source: int, reason: int) -> bytes:
    return _pdu(A_ASSOCIATE_RJ, bytes((0, result, source, reason)))


RELEASE_RP = _pdu(A_RELEASE_RP, bytes(4))


def abort(source: int = 2, reason: int = 0) -> bytes:
    return _pdu(A_ABORT, bytes((0, 0, source, reason)))


def p_data(context_id: int, payload: bytes, command: bool, max_pdu: int) -> list[bytes]:
    """P-DATA-TF PDUs carrying one message part, each within the peer's ``max_pdu`` (0: no limit)."""
    room = len(payload) if not max_pdu else max(max_pdu - 6, 1)
    flags = 0x01 if command else 0x00
    pdus, offset = [], 0
    while True:
        piece = payload[offset : offset + room]
        offset += len(piece)
        last = offset >= len(payload)
        pdv = struct.pack(">LBB", len(piece) + 2, context_id, flags | (0x02 if last else 0)) + piece
        pdus.append(_pdu(P_DATA_TF, pdv))
        if last:
            return pdus


# ---- Command sets (PS3.7 Table E.1-1), Implicit VR Little Endian ------------------------------------

US_TAGS = frozenset({0x0100, 0x0110, 0x0120, 0x0700, 0x0800, 0x0900, 0x1002, 0x1031})
UI_TAGS = frozenset({0x0002, 0x0003, 0x1000, 0x1001})

COMMAND_FIELD, MESSAGE_ID, DATA_SET_TYPE = 0x0100, 0x0110, 0x0800
AFFECTED_SOP_CLASS, AFFECTED_SOP_INSTANCE = 0x0002, 0x1000
NO_DATA_SET = 0x0101


def parse_command(raw: bytes | bytearray | memoryview) -> dict[int, bytes]:
    """The command set's elements by element number (group 0000 only), raw values."""
    view = memoryview(raw)
    out: dict[int, bytes] = {}
    i = 0
    while i < len(view):
        if i + 8 > len(view):
            raise PduError("command set cut inside an element header")
        group, element, length = struct.unpack_from("<HHL", view, i)
        i += 8
        if group != 0 or i + length > len(view):
            raise PduError("command set element outside group 0000 or longer than the command")
        out[element] = bytes(view[i : i + length])
        i += length
    return out


def command_us(command: dict[int, bytes], element: int) -> int | None:
    value = command.get(element)
    if value is None or len(value) != 2:
        return None
    return int(struct.unpack("<H", value)[0])


def command_ui(command: dict[int, bytes], element: int) -> str:
    return command.get(element, b"").rstrip(b"\x00 ").decode("ascii", "replace")


def encode_command(elements: dict[int, int | str]) -> bytes:
    """A command set of US (int) and UI / LO (str) elements, with its group length first."""
    parts = []
    for element in sorted(elements):
        value = elements[element]
        if isinstance(value, int):
            raw = struct.pack("<H", value)
        else:
            raw = value.encode("ascii", "replace")
            if len(raw) % 2:
                raw += b"\x00" if element in UI_TAGS else b" "
        parts.append(struct.pack("<HHL", 0, element, len(raw)) + raw)
    body = b"".join(parts)
    return struct.pack("<HHLL", 0, 0, 4, len(body)) + body
