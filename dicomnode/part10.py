"""The DICOM File Format header (PS3.10 7.1) of a received data set, encoded without pydicom.

A C-STORE data set is stored exactly as it came, behind a 128-byte preamble, ``DICM`` and the File
Meta Information group (0002) in Explicit VR Little Endian. That header has seven elements whose
only varying values are three UIDs, so it is written here directly: byte for byte what
``pynetdicom.events.Event.encoded_dataset()`` writes, at a fraction of the cost of building and
encoding a pydicom dataset for every received instance.
"""

from __future__ import annotations

import struct

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

PREAMBLE = b"\x00" * 128 + b"DICM"


def _element(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    """One Explicit VR Little Endian element (PS3.5 7.1.2); OB has the long form."""
    if vr == b"OB":
        return struct.pack("<HH2s2xL", group, element, vr, len(value)) + value
    return struct.pack("<HH2sH", group, element, vr, len(value)) + value


def _ui(value: str) -> bytes:
    """A UI value padded to even length with NUL (PS3.5 9.1); unrepresentable characters become '?'."""
    raw = value.encode("ascii", "replace")
    return raw + b"\x00" * (len(raw) % 2)


def _sh(value: str) -> bytes:
    raw = value.encode("ascii", "replace")
    return raw + b" " * (len(raw) % 2)


_VERSION = _element(0x0002, 0x0001, b"OB", b"\x00\x01")
_IMPLEMENTATION = _element(0x0002, 0x0012, b"UI", _ui(str(PYNETDICOM_IMPLEMENTATION_UID))) + _element(
    0x0002, 0x0013, b"SH", _sh(PYNETDICOM_IMPLEMENTATION_VERSION)
)


def file_header(MediaStorageSOPClassUID: str, MediaStorageSOPInstanceUID: str, TransferSyntaxUID: str) -> bytes:
    """Preamble, ``DICM`` and File Meta Information for a data set of this class, instance and syntax."""
    group = b"".join(
        (
            _VERSION,
            _element(0x0002, 0x0002, b"UI", _ui(MediaStorageSOPClassUID)),
            _element(0x0002, 0x0003, b"UI", _ui(MediaStorageSOPInstanceUID)),
            _element(0x0002, 0x0010, b"UI", _ui(TransferSyntaxUID)),
            _IMPLEMENTATION,
        )
    )
    return PREAMBLE + _element(0x0002, 0x0000, b"UL", struct.pack("<L", len(group))) + group
