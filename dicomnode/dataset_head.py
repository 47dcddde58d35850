"""A received data set read without decoding pixels: its element headers walked, its values checked.

Two jobs for the Storage SCP (:mod:`dicomnode.dataset_checks`), done on the association thread:

- :func:`walk` follows every element header (PS3.5 7.1, 7.5): each declared length must fit in the
  received bytes, each undefined-length value must reach its delimiter, each VR code under explicit
  VR must be one of PS3.5 Table 6.2-1; it notes where the top-level pixel element is and how its
  value is laid out. pydicom reads a truncated value as a shorter one without complaint, so this is
  done here.
- :func:`read_head` returns the values the node decides on (:data:`KEYWORDS`), and refuses the data
  set when any element before the pixel element is one pydicom could not convert (every stored file
  is read by pydicom later: by the worker, the console, a delivery).

``read_head`` has two ways to the same answer. The exact one parses the head with pydicom and
converts every element. The fast one serves Explicit VR Little Endian, native or encapsulated (what
nearly every sender uses), from the walked headers, at a few microseconds per element instead of
pydicom's ~12: it converts only the values the node needs and the elements whose conversion can
fail, with pydicom's own converter (:func:`pydicom.values.convert_value`). Which can fail was
established by feeding every converter arbitrary bytes: numbers whose length is not a multiple of
their size (``BytesLengthException``), Integer String values that overflow, and sequences; text
conversion replaces what it cannot decode, it never raises. Sequences and UN elements (which pydicom
re-reads with the dictionary's VR) are handed to pydicom whole, with the Specific Character Set.
Tests hold the two ways to the same values and the same refusals.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from dataclasses import dataclass, field
from typing import Any

from pydicom.charset import convert_encodings
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.tag import Tag
from pydicom.uid import UID
from pydicom.values import convert_value

from dicomnode.log_escape import printable
from dicomnode.store_status import CANNOT_UNDERSTAND, ELEMENT_INVALID, ENCAPSULATION_INVALID, Refusal

VR_CODES = frozenset(
    code.encode()
    for code in (
        "AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV"
    ).split()
)
"""The VR codes of PS3.5 Table 6.2-1: any other two bytes under explicit VR are not DICOM."""

KEYWORDS = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "BodyPartExamined",
    "ViewPosition",
    "ImageType",
    "SyntheticData",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "NumberOfFrames",
    "Rows",
    "Columns",
    "BitsAllocated",
    "ContributingEquipmentSequence",
)
"""The attributes the checks, the ``instances`` row and the rules' facts are made of."""

_KEYWORD_OF: dict[int, str] = {int(tag_for_keyword(keyword) or 0): keyword for keyword in KEYWORDS}
_SPECIFIC_CHARACTER_SET = 0x00080005
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
_NUMBER_SIZES = {b"FD": 8, b"FL": 4, b"SL": 4, b"SS": 2, b"SV": 8, b"UL": 4, b"US": 2, b"UV": 8}
_CONVERTED = frozenset({b"IS"})  # converted to see that it can be: an Integer String can overflow
_TO_PYDICOM = frozenset({b"SQ", b"UN"})  # elements pydicom reads whole
_UNDEFINED_LENGTH = 0xFFFFFFFF
_ITEM, _ITEM_DELIMITER, _SEQUENCE_DELIMITER = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # Pixel Data, Float and Double Float Pixel Data


@dataclass
class PixelDataLayout:
    """Where the top-level pixel element is: native ``length``, or encapsulated ``items`` lengths."""

    tag: int
    length: int | None = None  # None: undefined length (encapsulated)
    items: list[int] = field(default_factory=list)  # Basic Offset Table first, then the fragments
    offset_table: bytes = b""  # the Basic Offset Table's value


def _truncated(pos: int, what: str) -> Refusal:
    return Refusal(CANNOT_UNDERSTAND, f"data set truncated at byte {pos} ({what})")


def _where(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


class _Walker:
    """Skips data elements (PS3.5 7.1, 7.5), notes the top-level pixel element and, when asked,
    every top-level element before it as ``(tag, vr, start, value start, end)``."""

    def __init__(self, buf: bytes | memoryview, implicit: bool, order: str, record: bool = False) -> None:
        self.buf, self.implicit, self.order = buf, implicit, order
        self.pixels: PixelDataLayout | None = None
        self.pixels_at: int | None = None  # where the first top-level pixel element starts
        self.record = record
        self.elements_before_pixels: list[tuple[int, bytes, int, int, int]] = []

    def elements(self, pos: int, implicit: bool, in_item: bool) -> int:
        """Skip elements from ``pos``; inside an undefined-length item stop after its delimiter."""
        buf, order, end = self.buf, self.order, len(self.buf)
        record = self.record and not in_item
        unpack_from = struct.unpack_from
        while pos < end:
            if pos + 8 > end:
                if not in_item and pos > 0 and not any(buf[pos:]):
                    return end  # a few bytes of trailing zero padding, as some senders add
                raise _truncated(pos, "element header")
            group, element = unpack_from(order + "HH", buf, pos)
            tag, start = group << 16 | element, pos
            if tag == _ITEM_DELIMITER and in_item:
                return pos + 8
            vr = bytes(buf[pos + 4 : pos + 6])  # buf may be a memoryview of the received PDU
            if implicit or group == 0xFFFE:
                (length,), pos = unpack_from(order + "L", buf, pos + 4), pos + 8
            elif vr in _LONG_VRS:
                if pos + 12 > end:
                    raise _truncated(pos, "element header")
                (length,), pos = unpack_from(order + "L", buf, pos + 8), pos + 12
            elif vr in VR_CODES:
                (length,), pos = unpack_from(order + "H", buf, pos + 6), pos + 8
            else:
                raise Refusal(ELEMENT_INVALID, f"{_where(tag)} has invalid VR {printable(vr)!r}")
            top_pixels = not in_item and tag in PIXEL_TAGS
            if top_pixels and self.pixels_at is None:
                self.pixels_at = start
            if top_pixels:
                self.pixels = PixelDataLayout(tag, None if length == _UNDEFINED_LENGTH else length)
            value_start = pos
            if length == _UNDEFINED_LENGTH:
                if top_pixels:
                    pos = self.fragments(pos)
                else:  # items of an undefined-length UN value are Implicit VR Little Endian (PS3.5 6.2.2)
                    pos = self.items(pos, implicit or vr == b"UN", tag)
            elif pos + length > end:
                raise _truncated(pos, f"value of {_where(tag)} needs {length} bytes")
            else:
                pos += length
            if record and self.pixels_at is None:
                self.elements_before_pixels.append((tag, vr, start, value_start, pos))
        if in_item:
            raise _truncated(pos, "no item delimiter")
        return pos

    def items(self, pos: int, implicit: bool, parent: int) -> int:
        """Skip the items of an undefined-length value up to and including its sequence delimiter."""
        buf = self.buf
        while pos + 8 <= len(buf):
            group, element, length = struct.unpack_from(self.order + "HHL", buf, pos)
            tag, pos = group << 16 | element, pos + 8
            if tag == _SEQUENCE_DELIMITER:
                return pos
            if tag != _ITEM:
                raise Refusal(CANNOT_UNDERSTAND, f"({group:04X},{element:04X}) where an item of {parent:08X} belongs")
            if length == _UNDEFINED_LENGTH:
                pos = self.elements(pos, implicit, in_item=True)
            elif pos + length > len(buf):
                raise _truncated(pos, f"item of {parent:08X} needs {length} bytes")
            else:
                pos += length
        raise _truncated(pos, f"no sequence delimiter for {parent:08X}")

    def fragments(self, pos: int) -> int:
        """Skip encapsulated Pixel Data (PS3.5 A.4): defined-length items up to the sequence delimiter."""
        assert self.pixels is not None
        buf = self.buf
        while pos + 8 <= len(buf):
            group, element, length = struct.unpack_from(self.order + "HHL", buf, pos)
            tag, pos = group << 16 | element, pos + 8
            if tag == _SEQUENCE_DELIMITER:
                return pos
            if tag != _ITEM:
                raise Refusal(ENCAPSULATION_INVALID, f"({group:04X},{element:04X}) among Pixel Data fragments")
            if length == _UNDEFINED_LENGTH:
                raise Refusal(ENCAPSULATION_INVALID, "Pixel Data fragment of undefined length")
            if pos + length > len(buf):
                raise _truncated(pos, f"Pixel Data fragment needs {length} bytes")
            if not self.pixels.items:
                self.pixels.offset_table = bytes(buf[pos : pos + length])
            self.pixels.items.append(length)
            pos += length
        raise _truncated(pos, "no sequence delimiter after the Pixel Data fragments")


def fast_path(transfer_syntax: UID) -> bool:
    """Whether :func:`read_head` reads data sets in ``transfer_syntax`` from the walked headers
    (explicit VR little endian; a deflated data set is walked and read inflated)."""
    return not transfer_syntax.is_implicit_VR and transfer_syntax.is_little_endian


@dataclass
class Walked:
    """A walked data set: the bytes walked (inflated, if it was deflated) and what the walk noted."""

    body: bytes | memoryview  # inflated, if the data set was deflated
    transfer_syntax: UID
    pixels: PixelDataLayout | None
    pixels_at: int | None
    elements: list[tuple[int, bytes, int, int, int]]  # top-level, before the pixel element (fast path)


def walk(body: bytes | memoryview, transfer_syntax: UID) -> Walked:
    """Walk every element header of ``body``; :class:`Refusal` unless it is whole and well formed."""
    if transfer_syntax.is_deflated:
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)  # PS3.5 A.5: raw deflate, no zlib header
        try:
            body = inflater.decompress(body) + inflater.flush()
        except zlib.error as e:
            raise Refusal(CANNOT_UNDERSTAND, f"deflated data set cannot be inflated: {e}") from e
        if not inflater.eof:
            raise _truncated(len(body), "deflate stream has no end")
    order = "<" if transfer_syntax.is_little_endian else ">"
    walker = _Walker(body, transfer_syntax.is_implicit_VR, order, fast_path(transfer_syntax))
    walker.elements(0, transfer_syntax.is_implicit_VR, in_item=False)
    return Walked(body, transfer_syntax, walker.pixels, walker.pixels_at, walker.elements_before_pixels)


# ---- Values ---------------------------------------------------------------------------------------------


def _convert_all(ds: Dataset) -> None:
    """Convert every element (sequences included); pydicom converts lazily, so errors surface here."""
    for tag in list(ds.keys()):
        try:
            element = ds[tag]  # the conversion
        except Exception as e:
            raise Refusal(ELEMENT_INVALID, f"{_where(int(tag))} cannot be parsed: {type(e).__name__}") from e
        if element.VR == "SQ":
            for item in element.value:
                _convert_all(item)


def _pydicom_read(data: bytes | memoryview, transfer_syntax: UID) -> Dataset:
    """``data`` (whole elements; inflated if deflated) parsed by pydicom, every element converted; or
    :class:`Refusal`."""
    try:
        ds = read_dataset(io.BytesIO(data), transfer_syntax.is_implicit_VR, transfer_syntax.is_little_endian)
    except Exception as e:  # whatever pydicom raises on bytes it cannot read
        raise Refusal(CANNOT_UNDERSTAND, f"cannot parse data set: {type(e).__name__}") from e
    _convert_all(ds)
    return ds


def _values_of(ds: Dataset) -> dict[str, Any]:
    return {keyword: ds[keyword].value for keyword in KEYWORDS if keyword in ds}


def read_head_exact(walked: Walked) -> dict[str, Any]:
    """:data:`KEYWORDS` present in the data set, by pydicom: the head parsed and every element converted."""
    head = walked.body if walked.pixels_at is None else walked.body[: walked.pixels_at]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _values_of(_pydicom_read(head, walked.transfer_syntax))


class _Exact(Exception):
    """The fast path leaves this data set to pydicom: an unusual Specific Character Set element, or an
    item or delimiter tag at the top level."""


def _encodings(vr: bytes, value: bytes) -> list[str]:
    """The Python codecs of a Specific Character Set value, as pydicom picks them."""
    if vr != b"CS":
        raise _Exact
    raw = RawDataElement(Tag(_SPECIFIC_CHARACTER_SET), "CS", len(value), value, 0, False, True)
    try:
        return convert_encodings(convert_value("CS", raw))
    except Exception as e:  # pydicom's read then fails as a whole: let it say how
        raise _Exact from e


def read_head(walked: Walked) -> dict[str, Any]:
    """:data:`KEYWORDS` present in the data set, as pydicom reads them; :class:`Refusal` when an element
    before the pixel element would not convert. Fast for Explicit VR Little Endian (module docstring)."""
    if not fast_path(walked.transfer_syntax):
        return read_head_exact(walked)
    try:
        return _read_head_fast(walked)
    except _Exact:
        return read_head_exact(walked)


def _read_head_fast(walked: Walked) -> dict[str, Any]:
    body = walked.body
    values: dict[str, Any] = {}
    whole: list[tuple[int, int]] = []  # elements pydicom reads: sequences, UN
    charset: tuple[int, int] | None = None
    encodings: list[str] | None = None

    def by_pydicom() -> None:
        """Read the ``whole`` elements (with the character set) by pydicom, their values into ``values``."""
        parts = [] if charset is None or charset[0] > whole[0][0] else [body[charset[0] : charset[1]]]
        parts += [body[start:end] for start, end in whole]
        values.update(_values_of(_pydicom_read(b"".join(parts), walked.transfer_syntax)))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for tag, vr, start, value_start, end in walked.elements:
            if tag == _SPECIFIC_CHARACTER_SET:
                charset = (start, end)
                encodings = _encodings(vr, bytes(body[value_start:end]))
            if tag >> 16 == 0xFFFE:  # an item or delimiter tag out of place: pydicom may stop reading there
                raise _Exact
            if vr in _TO_PYDICOM:
                whole.append((start, end))
                continue
            try:
                value = _checked_value(body, tag, vr, value_start, end, encodings)
            except Refusal:
                if whole:  # an earlier element's refusal first, as pydicom would meet it
                    by_pydicom()
                raise
            if value is not _SKIPPED:
                values[_KEYWORD_OF[tag]] = value
        if whole:
            by_pydicom()
    return values


_SKIPPED = object()


def _checked_value(
    body: bytes | memoryview, tag: int, vr: bytes, value_start: int, end: int, encodings: list[str] | None
) -> Any:
    """The value of a needed element, or :data:`_SKIPPED`; :class:`Refusal` when pydicom could not
    convert it (only numbers of a wrong length and Integer Strings can fail, sequences aside)."""
    size = _NUMBER_SIZES.get(vr)
    if size is not None and (end - value_start) % size:
        raise Refusal(ELEMENT_INVALID, f"{_where(tag)} cannot be parsed: BytesLengthException")
    if tag not in _KEYWORD_OF and vr not in _CONVERTED:
        return _SKIPPED
    value = bytes(body[value_start:end])
    raw = RawDataElement(Tag(tag), vr.decode(), len(value), value, value_start, False, True)
    try:
        converted = convert_value(raw.VR, raw, encodings)  # type: ignore[arg-type]  # VR is str here
    except Exception as e:
        raise Refusal(ELEMENT_INVALID, f"{_where(tag)} cannot be parsed: {type(e).__name__}") from e
    return converted if tag in _KEYWORD_OF else _SKIPPED
