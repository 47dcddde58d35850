"""What the Storage SCP checks in a received C-STORE before it acknowledges it, without decoding pixels.

PS3.4 B.2.3 leaves the checks to the SCP; an acknowledged instance is the node's promise that it
holds an object it can use, so a data set that could never be stored or read is refused here, on the
association, with the status the sender must see (never 0xA7xx, which means "retry later"):

- the data set is whole: every element header and declared length fits in the received bytes, every
  undefined-length value reaches its delimiter (PS3.5 7.1, 7.5), every VR code under explicit VR is one
  of PS3.5 Table 6.2-1, and every element value converts (0xC210 truncated, 0xC218 unparsable);
- the UIDs the node relies on are present and valid (PS3.5 9.1; 0xC212), and the SOP Instance UID is
  the one the request names (0xC213);
- the command's Affected SOP Class UID, the presentation context's abstract syntax and the data set's
  SOP Class UID are one class (0xA900 "Data Set does not match SOP Class");
- an image storage class carries Pixel Data (0xC214) whose description is usable (0xC219);
- native Pixel Data is exactly Rows x Columns x Samples per Pixel x Bits Allocated / 8 x Number of
  Frames bytes long, one padding byte allowed (PS3.5 8.1.1; 0xC215);
- Pixel Data is encapsulated if and only if the transfer syntax is (PS3.5 A.4; 0xC216), and then holds
  a Basic Offset Table item and at least one fragment per frame (not for MPEG video streams), all of
  even length, the offsets pointing at fragment starts (0xC217).

Only element headers are walked; no value of Pixel Data is read. Each failure is a :class:`Refusal`
carrying the status and a short Error Comment; values from the peer in it are escaped.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from dataclasses import dataclass, field
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_dataset
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import RE_VALID_UID, UID, MPEGTransferSyntaxes
from pynetdicom import sop_class

from dicomnode.errors import DicomInputError
from dicomnode.log_escape import printable
from storage.instances import fields_from_dataset

# ---- C-STORE failure statuses (PS3.4 Table B.2-1) -------------------------------------------------
OUT_OF_RESOURCES = 0xA700  # resources only: disk, database
DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
# "Error: Cannot understand" is the range 0xCxxx. pynetdicom answers 0xC211 itself when a handler
# raises, so the node's own reasons use the other codes below.
CANNOT_UNDERSTAND = 0xC210  # the data set is truncated or its structure cannot be walked
INVALID_UID = 0xC212  # a UID the node relies on is missing or not a valid UID
SOP_INSTANCE_MISMATCH = 0xC213  # SOP Instance UID differs from the Affected SOP Instance UID
NO_PIXEL_DATA = 0xC214  # an image storage SOP class without Pixel Data
PIXEL_DATA_LENGTH = 0xC215  # native Pixel Data shorter or longer than the image it describes
PIXEL_DATA_ENCODING = 0xC216  # encapsulated Pixel Data under a native transfer syntax, or the reverse
ENCAPSULATION_INVALID = 0xC217  # no Basic Offset Table item, bad offsets, odd or missing fragments
ELEMENT_INVALID = 0xC218  # an invalid VR code, or an element value that does not convert
PIXEL_DESCRIPTION_INVALID = 0xC219  # Rows, Columns, Bits Allocated... missing or impossible

ERROR_COMMENT_MAX = 64  # Error Comment (0000,0902) is LO

IMAGE_STORAGE_CLASSES: frozenset[str] = frozenset(
    str(getattr(sop_class, name)) for name in dir(sop_class) if "ImageStorage" in name
)
"""Storage SOP Classes whose IOD includes the Image Pixel Module (PS3.3 C.7.6.3), so Pixel Data."""

VR_CODES = frozenset(
    code.encode()
    for code in (
        "AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV"
    ).split()
)
"""The VR codes of PS3.5 Table 6.2-1: any other two bytes under explicit VR are not DICOM."""

_UID_KEYWORDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
_TEXT_COLUMNS = ("modality", "body_part_examined", "view_position", "image_type")


class Refusal(DicomInputError):
    """A received data set the SCP answers with ``status`` and ``reason`` as its Error Comment."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


# ---- Walking the element headers ----------------------------------------------------------------------
# pydicom reads a truncated value as a shorter one without complaint, so the headers are walked here.

_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
_UNDEFINED_LENGTH = 0xFFFFFFFF
_ITEM, _ITEM_DELIMITER, _SEQUENCE_DELIMITER = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # Pixel Data, Float and Double Float Pixel Data


@dataclass
class PixelDataLayout:
    """Where the top-level pixel element is: native ``length``, or encapsulated ``items`` lengths."""

    tag: int
    length: int | None = None  # None: undefined length (encapsulated)
    items: list[int] = field(default_factory=list)  # Basic Offset Table first, then the fragments
    offset_table: bytes = b""  # the Basic Offset Table's value


def _truncated(pos: int, what: str) -> Refusal:
    return Refusal(CANNOT_UNDERSTAND, f"data set truncated at byte {pos} ({what})")


class _Walker:
    """Skips data elements (PS3.5 7.1, 7.5) and notes the top-level pixel element."""

    def __init__(self, buf: bytes | memoryview, implicit: bool, order: str) -> None:
        self.buf, self.implicit, self.order = buf, implicit, order
        self.pixels: PixelDataLayout | None = None
        self.pixels_at: int | None = None  # where the first top-level pixel element starts

    def elements(self, pos: int, implicit: bool, in_item: bool) -> int:
        """Skip elements from ``pos``; inside an undefined-length item stop after its delimiter."""
        buf, order, end = self.buf, self.order, len(self.buf)
        while pos < end:
            if pos + 8 > end:
                if not in_item and pos > 0 and not any(buf[pos:]):
                    return end  # a few bytes of trailing zero padding, as some senders add
                raise _truncated(pos, "element header")
            group, element = struct.unpack_from(order + "HH", buf, pos)
            tag, start = group << 16 | element, pos
            if tag == _ITEM_DELIMITER and in_item:
                return pos + 8
            vr = bytes(buf[pos + 4 : pos + 6])  # buf may be a memoryview of the received PDU
            if implicit or group == 0xFFFE:
                (length,), pos = struct.unpack_from(order + "L", buf, pos + 4), pos + 8
            elif vr in _LONG_VRS:
                if pos + 12 > end:
                    raise _truncated(pos, "element header")
                (length,), pos = struct.unpack_from(order + "L", buf, pos + 8), pos + 12
            elif vr in VR_CODES:
                (length,), pos = struct.unpack_from(order + "H", buf, pos + 6), pos + 8
            else:
                raise Refusal(ELEMENT_INVALID, f"({group:04X},{element:04X}) has invalid VR {printable(vr)!r}")
            top_pixels = not in_item and tag in _PIXEL_TAGS
            if top_pixels and self.pixels_at is None:
                self.pixels_at = start
            if top_pixels:
                self.pixels = PixelDataLayout(tag, None if length == _UNDEFINED_LENGTH else length)
            if length == _UNDEFINED_LENGTH:
                if top_pixels:
                    pos = self.fragments(pos)
                else:  # items of an undefined-length UN value are Implicit VR Little Endian (PS3.5 6.2.2)
                    pos = self.items(pos, implicit or vr == b"UN", tag)
            elif pos + length > end:
                raise _truncated(pos, f"value of ({group:04X},{element:04X}) needs {length} bytes")
            else:
                pos += length
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


def check_complete(body: bytes, transfer_syntax: UID) -> PixelDataLayout | None:
    """Raise :class:`Refusal` unless ``body`` is a whole data set encoded in ``transfer_syntax``.

    Returns where its top-level pixel element is (None when it has none). Only element headers are
    read: no value is decoded, pixel data least of all.
    """
    return _walk(body, transfer_syntax).pixels


def _walk(body: bytes | memoryview, transfer_syntax: UID) -> _Walker:
    if transfer_syntax.is_deflated:
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)  # PS3.5 A.5: raw deflate, no zlib header
        try:
            body = inflater.decompress(body) + inflater.flush()
        except zlib.error as e:
            raise Refusal(CANNOT_UNDERSTAND, f"deflated data set cannot be inflated: {e}") from e
        if not inflater.eof:
            raise _truncated(len(body), "deflate stream has no end")
    walker = _Walker(body, transfer_syntax.is_implicit_VR, "<" if transfer_syntax.is_little_endian else ">")
    walker.elements(0, transfer_syntax.is_implicit_VR, in_item=False)
    return walker


# ---- Values ---------------------------------------------------------------------------------------------


def _valid_uid(value: object) -> bool:
    """A UID per PS3.5 9.1: at most 64 characters, digits and dots, no leading zeros."""
    return isinstance(value, str) and len(value) <= 64 and RE_VALID_UID.match(value) is not None


def _convert_all(ds: Dataset) -> None:
    """Convert every element (sequences included); pydicom converts lazily, so errors surface here."""
    tag = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for element in ds.iterall():
                tag = element.tag
                _ = element.value
    except Exception as e:
        where = f"({tag.group:04X},{tag.element:04X})" if tag is not None else "an element"
        raise Refusal(ELEMENT_INVALID, f"{where} cannot be parsed: {type(e).__name__}") from e


def _int_attribute(ds: Dataset, keyword: str, default: int | None = None) -> int:
    value = ds.get(keyword, default)
    try:
        number = int(value) if value is not None else -1
    except (TypeError, ValueError):
        number = -1
    if number < 1:
        raise Refusal(PIXEL_DESCRIPTION_INVALID, f"{keyword} missing or invalid for Pixel Data")
    return number


def check_pixel_data(ds: Dataset, pixels: PixelDataLayout | None, transfer_syntax: UID) -> None:
    """Pixel Data as the SOP class, the image description and the transfer syntax require."""
    if pixels is None:
        if str(ds.SOPClassUID) in IMAGE_STORAGE_CLASSES:
            raise Refusal(NO_PIXEL_DATA, "image storage SOP class without Pixel Data")
        return
    for keyword in ("Rows", "Columns", "BitsAllocated", "SamplesPerPixel"):
        _int_attribute(ds, keyword, 1 if keyword == "SamplesPerPixel" and pixels.tag != 0x7FE00010 else None)
    frames = _int_attribute(ds, "NumberOfFrames", 1)
    if transfer_syntax.is_encapsulated:
        if pixels.length is not None:
            raise Refusal(PIXEL_DATA_ENCODING, f"native Pixel Data under compressed {transfer_syntax.name}")
        if transfer_syntax not in MPEGTransferSyntaxes:  # a video stream's fragments are not frames
            _check_fragments(pixels, frames)
        elif not pixels.items:
            raise Refusal(ENCAPSULATION_INVALID, "encapsulated Pixel Data without Basic Offset Table item")
        return
    if pixels.length is None:
        raise Refusal(PIXEL_DATA_ENCODING, f"encapsulated Pixel Data under native {transfer_syntax.name}")
    if ds.BitsAllocated != 1 and ds.BitsAllocated % 8:
        raise Refusal(PIXEL_DESCRIPTION_INVALID, f"Bits Allocated {ds.BitsAllocated} is not 1 or a multiple of 8")
    try:
        expected = get_expected_length(ds, unit="bytes")
    except Exception as e:
        raise Refusal(PIXEL_DESCRIPTION_INVALID, f"image description unusable: {type(e).__name__}") from e
    if pixels.length not in (expected, expected + expected % 2):
        raise Refusal(PIXEL_DATA_LENGTH, f"Pixel Data is {pixels.length} bytes, the image needs {expected}")


def _check_fragments(pixels: PixelDataLayout, frames: int) -> None:
    """A Basic Offset Table item, then at least one even-length fragment per frame (PS3.5 A.4).

    A non-empty Basic Offset Table has one offset per frame, the first 0, increasing, each the start
    of a fragment item counted from the first fragment's item tag.
    """
    items = pixels.items
    if not items:
        raise Refusal(ENCAPSULATION_INVALID, "encapsulated Pixel Data without Basic Offset Table item")
    table, fragments = items[0], items[1:]
    if len(fragments) < frames:
        raise Refusal(ENCAPSULATION_INVALID, f"{len(fragments)} Pixel Data fragments for {frames} frames")
    if any(length % 2 for length in items):
        raise Refusal(ENCAPSULATION_INVALID, "Pixel Data item of odd length")
    if table and table != 4 * frames:
        raise Refusal(ENCAPSULATION_INVALID, f"Basic Offset Table of {table} bytes for {frames} frames")
    if not table:
        return
    starts, position = set(), 0
    for length in fragments:
        starts.add(position)
        position += 8 + length
    values = struct.unpack(f"<{frames}L", pixels.offset_table)
    if values[0] != 0 or any(b <= a for a, b in zip(values, values[1:], strict=False)):
        raise Refusal(ENCAPSULATION_INVALID, "Basic Offset Table offsets do not start at 0 and increase")
    if any(value not in starts for value in values):
        raise Refusal(ENCAPSULATION_INVALID, "Basic Offset Table offset not at a fragment start")


# ---- The whole check ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    """A checked C-STORE data set: parsed up to Pixel Data, and its ``instances`` columns."""

    ds: Dataset
    fields: dict[str, Any]


def _parse_head(header: bytes, head: bytes | memoryview, transfer_syntax: UID) -> Dataset:
    """The data set up to its pixel element, with File Meta Information naming the transfer syntax.

    A native data set is read as it is (its File Meta Information is the node's own, not parsed back);
    a deflated one goes through ``dcmread``, which inflates it.
    """
    if transfer_syntax.is_deflated:
        return dcmread(io.BytesIO(b"".join((header, head))), stop_before_pixels=True)
    ds = read_dataset(io.BytesIO(head), transfer_syntax.is_implicit_VR, transfer_syntax.is_little_endian)
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = transfer_syntax
    ds.file_meta = meta
    ds.set_original_encoding(transfer_syntax.is_implicit_VR, transfer_syntax.is_little_endian)
    return ds


def check_c_store(
    header: bytes,
    body: bytes | memoryview,
    transfer_syntax: UID,
    abstract_syntax: str,
    AffectedSOPClassUID: str,
    AffectedSOPInstanceUID: str,
) -> Received:
    """Every check of the module docstring, in the order a sender can best act on; or :class:`Refusal`.

    ``header`` is the preamble and File Meta Information the data set is stored behind, ``body`` the
    data set. Only what precedes the pixel element is parsed, so its bytes are never copied.
    """
    walked = _walk(body, transfer_syntax)
    pixels = walked.pixels
    head = body if walked.pixels_at is None or transfer_syntax.is_deflated else body[: walked.pixels_at]
    try:
        ds = _parse_head(header, head, transfer_syntax)
    except Exception as e:  # whatever pydicom raises on bytes it cannot read
        raise Refusal(CANNOT_UNDERSTAND, f"cannot parse data set: {type(e).__name__}") from e
    _convert_all(ds)
    for keyword in _UID_KEYWORDS:
        value = ds.get(keyword)
        if not _valid_uid(value):
            state = "missing" if keyword not in ds else f"invalid ({printable(value, 20)!r})"
            raise Refusal(INVALID_UID, f"{keyword} {state}")
    if AffectedSOPClassUID != abstract_syntax:
        raise Refusal(
            DATA_SET_DOES_NOT_MATCH_SOP_CLASS, f"request class {printable(AffectedSOPClassUID, 40)} not the context's"
        )
    if ds.SOPClassUID != AffectedSOPClassUID:
        raise Refusal(DATA_SET_DOES_NOT_MATCH_SOP_CLASS, f"SOP Class UID is {ds.SOPClassUID}")
    if ds.SOPInstanceUID != AffectedSOPInstanceUID:
        raise Refusal(SOP_INSTANCE_MISMATCH, "SOP Instance UID differs from the request's")
    check_pixel_data(ds, pixels, transfer_syntax)
    try:
        fields = fields_from_dataset(ds)
    except DicomInputError as e:
        raise Refusal(ELEMENT_INVALID, str(e)) from e
    except Exception as e:
        raise Refusal(ELEMENT_INVALID, f"cannot read the instance's attributes: {type(e).__name__}") from e
    for column in _TEXT_COLUMNS:
        value = fields.get(column)
        if value is not None and printable(value, len(value)) != value:
            raise Refusal(ELEMENT_INVALID, f"{column} holds a control character")
    return Received(ds, fields)
