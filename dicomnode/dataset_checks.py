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

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydicom.uid import RE_VALID_UID, UID, MPEGTransferSyntaxes
from pynetdicom import sop_class

from dicomnode.dataset_head import PixelDataLayout, read_head, walk
from dicomnode.errors import DicomInputError
from dicomnode.log_escape import printable
from dicomnode.rules import InstanceFacts, facts_from_dataset
from dicomnode.store_status import (  # noqa: F401  (the statuses are named from here too)
    CANNOT_UNDERSTAND,
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
    ELEMENT_INVALID,
    ENCAPSULATION_INVALID,
    ERROR_COMMENT_MAX,
    INVALID_UID,
    NO_PIXEL_DATA,
    OUT_OF_RESOURCES,
    PIXEL_DATA_ENCODING,
    PIXEL_DATA_LENGTH,
    PIXEL_DESCRIPTION_INVALID,
    SOP_INSTANCE_MISMATCH,
    Refusal,
)
from storage.instances import fields_from_values

IMAGE_STORAGE_CLASSES: frozenset[str] = frozenset(
    str(getattr(sop_class, name)) for name in dir(sop_class) if "ImageStorage" in name
)
"""Storage SOP Classes whose IOD includes the Image Pixel Module (PS3.3 C.7.6.3), so Pixel Data."""

_UID_KEYWORDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
_TEXT_COLUMNS = ("modality", "body_part_examined", "view_position", "image_type")


def check_complete(body: bytes, transfer_syntax: UID) -> PixelDataLayout | None:
    """Raise :class:`Refusal` unless ``body`` is a whole data set encoded in ``transfer_syntax``.

    Returns where its top-level pixel element is (None when it has none). Only element headers are
    read: no value is decoded, pixel data least of all.
    """
    return walk(body, transfer_syntax).pixels


def _valid_uid(value: object) -> bool:
    """A UID per PS3.5 9.1: at most 64 characters, digits and dots, no leading zeros."""
    return isinstance(value, str) and len(value) <= 64 and RE_VALID_UID.match(value) is not None


def _int_attribute(values: Mapping[str, Any], keyword: str, default: int | None = None) -> int:
    value = values.get(keyword, default)
    try:
        number = int(value) if value is not None else -1
    except (TypeError, ValueError):
        number = -1
    if number < 1:
        raise Refusal(PIXEL_DESCRIPTION_INVALID, f"{keyword} missing or invalid for Pixel Data")
    return number


def expected_length(values: Mapping[str, Any], frames: int) -> int:
    """Native Pixel Data bytes the image description needs, without a padding byte (PS3.5 8.1.1; the
    rule of :func:`pydicom.pixels.utils.get_expected_length`, YBR_FULL_422 as PS3.3 C.7.6.3.1.2)."""
    length = int(values["Rows"]) * int(values["Columns"]) * int(values.get("SamplesPerPixel", 1)) * frames
    bits = int(values["BitsAllocated"])
    length = length // 8 + (length % 8 > 0) if bits == 1 else length * (bits // 8)
    if values.get("PhotometricInterpretation") == "YBR_FULL_422":
        length = length // 3 * 2
    return length


def check_pixel_data(values: Mapping[str, Any], pixels: PixelDataLayout | None, transfer_syntax: UID) -> None:
    """Pixel Data as the SOP class, the image description and the transfer syntax require."""
    if pixels is None:
        if str(values.get("SOPClassUID")) in IMAGE_STORAGE_CLASSES:
            raise Refusal(NO_PIXEL_DATA, "image storage SOP class without Pixel Data")
        return
    for keyword in ("Rows", "Columns", "BitsAllocated", "SamplesPerPixel"):
        _int_attribute(values, keyword, 1 if keyword == "SamplesPerPixel" and pixels.tag != 0x7FE00010 else None)
    frames = _int_attribute(values, "NumberOfFrames", 1)
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
    bits = int(values["BitsAllocated"])
    if bits != 1 and bits % 8:
        raise Refusal(PIXEL_DESCRIPTION_INVALID, f"Bits Allocated {bits} is not 1 or a multiple of 8")
    expected = expected_length(values, frames)
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
    """A checked C-STORE data set: its ``instances`` columns and the facts the rules decide on."""

    fields: dict[str, Any]
    facts: InstanceFacts


def check_c_store(
    body: bytes | memoryview,
    transfer_syntax: UID,
    abstract_syntax: str,
    AffectedSOPClassUID: str,
    AffectedSOPInstanceUID: str,
) -> Received:
    """Every check of the module docstring, in the order a sender can best act on; or :class:`Refusal`.

    ``body`` is the data set as received. Only what precedes the pixel element is read, so its bytes
    are never copied.
    """
    walked = walk(body, transfer_syntax)
    values = read_head(walked)
    for keyword in _UID_KEYWORDS:
        value = values.get(keyword)
        if not _valid_uid(value):
            state = "missing" if keyword not in values else f"invalid ({printable(value, 20)!r})"
            raise Refusal(INVALID_UID, f"{keyword} {state}")
    if AffectedSOPClassUID != abstract_syntax:
        raise Refusal(
            DATA_SET_DOES_NOT_MATCH_SOP_CLASS, f"request class {printable(AffectedSOPClassUID, 40)} not the context's"
        )
    if values["SOPClassUID"] != AffectedSOPClassUID:
        raise Refusal(DATA_SET_DOES_NOT_MATCH_SOP_CLASS, f"SOP Class UID is {values['SOPClassUID']}")
    if values["SOPInstanceUID"] != AffectedSOPInstanceUID:
        raise Refusal(SOP_INSTANCE_MISMATCH, "SOP Instance UID differs from the request's")
    check_pixel_data(values, walked.pixels, transfer_syntax)
    try:
        fields = fields_from_values(values, transfer_syntax)
    except DicomInputError as e:
        raise Refusal(ELEMENT_INVALID, str(e)) from e
    except Exception as e:
        raise Refusal(ELEMENT_INVALID, f"cannot read the instance's attributes: {type(e).__name__}") from e
    for column in _TEXT_COLUMNS:
        value = fields.get(column)
        if value is not None and printable(value, len(value)) != value:
            raise Refusal(ELEMENT_INVALID, f"{column} holds a control character")
    return Received(fields, facts_from_dataset(values))
