"""DICOM value limits, in one place: what ``config check`` accepts, the writer accepts.

Maximum lengths per Value Representation are PS3.5 Table 6.2-1 (in characters; UI in bytes).
Values the node writes from the site configuration must be in the default character repertoire
(printable ASCII, PS3.5 6.1.2.1): every Specific Character Set a source may carry includes it, so
such a value can be written into any patient's study without an encoding problem.

Both :mod:`dicomnode.config` (at load and ``dicomnode config check``) and :mod:`dicomnode.derived`
(when an instance is built) call these functions, so a value cannot pass the one and then fail
every job in the other.
"""

from __future__ import annotations

import re

#: PS3.5 Table 6.2-1, maximum value length.
MAX_LENGTH: dict[str, int] = {
    "AE": 16,
    "AS": 4,
    "CS": 16,
    "DA": 8,
    "DS": 16,
    "IS": 12,
    "LO": 64,
    "LT": 10240,
    "SH": 16,
    "ST": 1024,
    "TM": 14,
    "UI": 64,
}

#: Code String: upper-case letters, digits, space and underscore (PS3.5 Table 6.2-1).
CS_PATTERN = re.compile(r"[A-Z0-9 _]{1,16}")
_DEFAULT_REPERTOIRE = re.compile(r"[\x20-\x7e]*")

#: Series Description (0008,103E) of a derived series is "<prefix> AI views az A..B el C..D (N)".
#: The writer keeps the part after the prefix to at most this many characters (angles are rounded
#: to whole degrees when the exact ones do not fit), so a prefix up to the rest always fits in LO.
SERIES_DESCRIPTION_LABEL_MAX = 40
SERIES_DESCRIPTION_PREFIX_MAX = MAX_LENGTH["LO"] - SERIES_DESCRIPTION_LABEL_MAX


def string_problem(value: object, vr: str = "LO", max_length: int | None = None) -> str | None:
    """Why ``value`` cannot be one value of a short text VR (LO, SH), or None when it can.

    One value: non-empty, at most ``max_length`` (default the VR's) characters, no backslash (the
    value separator), printable ASCII only (no control characters, default repertoire).
    """
    limit = MAX_LENGTH[vr] if max_length is None else min(max_length, MAX_LENGTH[vr])
    if not isinstance(value, str) or not value.strip():
        return "must be a non-empty string"
    if len(value) > limit:
        return f"is {len(value)} characters, at most {limit} fit"
    if "\\" in value:
        return "must not contain a backslash (the DICOM value separator)"
    if not _DEFAULT_REPERTOIRE.fullmatch(value):
        return "must be printable ASCII (the default character repertoire), without control characters"
    return None


def code_string_problem(value: object) -> str | None:
    """Why ``value`` is not a Code String (A-Z, 0-9, space, underscore; 1..16), or None."""
    if not isinstance(value, str) or not CS_PATTERN.fullmatch(value):
        return "must be a Code String (A-Z, 0-9, space, underscore; 1..16 characters)"
    return None
