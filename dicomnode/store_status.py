"""The C-STORE statuses the Storage SCP answers with, and the refusal that carries one.

PS3.4 Table B.2-1. "Error: Cannot understand" is the range 0xCxxx; pynetdicom answers 0xC211
itself when a handler raises, so the node's own reasons use the other codes below.
"""

from __future__ import annotations

from dicomnode.errors import DicomInputError

OUT_OF_RESOURCES = 0xA700  # resources only: disk, database
DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
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


class Refusal(DicomInputError):
    """A received data set the SCP answers with ``status`` and ``reason`` as its Error Comment."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
