"""Make values that came over the network safe to put in a log line.

A peer chooses its AE titles, UIDs and every other value it sends. Written into a log as they are,
a newline would forge a log line of the peer's choosing and a megabyte of text would flood the log.
:func:`printable` escapes control characters (C0, DEL, C1 and the Unicode line and paragraph
separators) the way Python string literals do, and caps the length. Every network-derived value
the SCP logs goes through it.
"""

from __future__ import annotations

import logging
import re

LOG_VALUE_MAX = 128  # characters kept of one value before "..." (a UI is at most 64)
LOG_MESSAGE_MAX = 16384  # characters kept of a whole message that SingleLineMessages escapes

_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if char in "\t\n\r":
        return repr(char)[1:-1]
    return f"\\x{ord(char):02x}" if ord(char) < 256 else f"\\u{ord(char):04x}"


def printable(value: object, limit: int = LOG_VALUE_MAX) -> str:
    """``value`` as text with control characters escaped (``\\n``, ``\\x00``...) and cut to ``limit``.

    Bytes are decoded as Latin-1 first so that every byte shows. The cut happens before escaping,
    so an escaped value can be up to four times ``limit`` long but never spans two lines.
    """
    text = value.decode("latin-1") if isinstance(value, bytes | bytearray) else str(value)
    cut = len(text) > limit
    if cut:
        text = text[:limit]
    return _UNSAFE.sub(_escape, text) + ("..." if cut else "")


class SingleLineMessages(logging.Filter):
    """A handler filter: every record's message stays on one line, whatever a library put in it.

    Defence in depth behind :func:`printable`: pynetdicom and pydicom log some received values as
    they are (an undecodable AE title or UID in an exception message). Tracebacks, which the
    formatter adds after the message, keep their lines.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if _UNSAFE.search(message):
            record.msg, record.args = printable(message, LOG_MESSAGE_MAX), None
        return True
