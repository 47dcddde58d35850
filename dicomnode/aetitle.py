"""Application Entity titles: the names DICOM nodes call each other by.

PS3.5 Table 6.2-1 (VR AE): at most 16 characters from the Default Character Repertoire
(ISO-IR 6, i.e. printable ASCII) excluding backslash (5CH) and control characters; leading and
trailing spaces are not significant, and a value of all spaces is not allowed. Every AE title the
node is configured with (its own, the allowed calling titles, each peer's) passes through
:func:`validate_ae_title`, so a typo fails at start-up instead of as a rejected association.
"""

from __future__ import annotations

from dicomnode.errors import ConfigError

AE_TITLE_MAX_LENGTH = 16


def validate_ae_title(value: object, key: str) -> str:
    """Return ``value`` without its insignificant spaces, or raise :class:`ConfigError` naming ``key``.

    The length limit applies to the value as written (PS3.5 6.2: 16 bytes maximum), the comparison
    value is the stripped one, which is also what pynetdicom compares against.
    """
    if not isinstance(value, str):
        raise ConfigError(f"{key}: an AE title must be a string, got {value!r}")
    if not 1 <= len(value) <= AE_TITLE_MAX_LENGTH:
        raise ConfigError(
            f"{key}: an AE title must be 1..{AE_TITLE_MAX_LENGTH} characters (PS3.5 VR AE), "
            f"got {len(value)} in {value!r}"
        )
    if "\\" in value:
        raise ConfigError(f"{key}: an AE title must not contain a backslash (PS3.5 VR AE), got {value!r}")
    bad = [c for c in value if not " " <= c <= "~"]
    if bad:
        raise ConfigError(
            f"{key}: an AE title may hold only printable ASCII without control characters "
            f"(PS3.5 VR AE), got {value!r}"
        )
    if not value.strip(" "):
        raise ConfigError(f"{key}: an AE title must not be all spaces (PS3.5 VR AE), got {value!r}")
    return value.strip(" ")
