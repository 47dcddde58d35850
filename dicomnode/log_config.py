"""Which loggers speak at the node's default level: the node's own, not its libraries'.

highdicom logs seven INFO lines per Secondary Capture it builds ("copy attributes of module …"),
pynetdicom one per DIMSE message (repeating what ``dicomnode.scp``/``dicomnode.scu`` already say
with the association id), Alembic one per migration step and APScheduler one per timer run. At the
default level and at ``-v`` these libraries report warnings and errors only; ``-vv`` (DEBUG) shows
everything. Only the CLI and the worker processes' entry point call this (style practice 7).
"""

from __future__ import annotations

import logging

#: Loggers of libraries whose INFO lines are chatter in the node's log.
LIBRARY_LOGGERS: tuple[str, ...] = ("highdicom", "pynetdicom", "alembic", "apscheduler")


def quiet_libraries(show: bool) -> None:
    """Let :data:`LIBRARY_LOGGERS` through at every level when ``show``, else only from WARNING up."""
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if show else logging.WARNING)
