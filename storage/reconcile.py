"""Start-up reconciliation of the store with the database.

An instance is renamed into the store, then its row is committed, then the C-STORE is answered
Success (the worker does the same for derived instances). A crash between the rename and the
commit leaves a complete file that nothing refers to and that nobody acknowledged. Such files are
moved, not deleted, to ``<store root>/quarantine/`` under their own relative path, where an
operator can look at them (``dicomnode status`` counts them) and delete or re-send them.

A file is quarantined only if no row names its path *and* it is older than ``min_age_s``: nodes
sharing one store (NFS) write concurrently, and a file another node renamed a moment ago may have
its row committed the next moment. Nothing with a row (acknowledged or recorded) is ever touched.

The reverse, a row whose file is missing or short, can follow a crash between the Storage SCP's
commit and its flush (:mod:`storage.durability`); :func:`rows_without_their_file` names those among
the newest rows, and changes nothing.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from storage.models import Instance
from storage.store import SUFFIX, TEMP_PREFIX, InstanceStore

logger = logging.getLogger(__name__)

QUARANTINE = "quarantine"
DEFAULT_MIN_AGE_S = 600.0
_CHUNK = 500


@dataclass(frozen=True)
class Quarantined:
    """A file moved out of the store: where it was (relative) and where it is now (relative)."""

    path: str
    quarantine_path: str


def store_files(store: InstanceStore) -> list[str]:
    """Relative POSIX paths of every finished instance file in the store (not partial, not quarantined)."""
    root = store.root
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == root and QUARANTINE in dirnames:
            dirnames.remove(QUARANTINE)
        for name in filenames:
            if name.endswith(SUFFIX) and not name.startswith(TEMP_PREFIX):
                found.append((Path(dirpath) / name).relative_to(root).as_posix())
    return sorted(found)


def unrecorded_files(session: Session, paths: list[str]) -> list[str]:
    """The paths among ``paths`` that no instance row names."""
    recorded: set[str] = set()
    for i in range(0, len(paths), _CHUNK):
        chunk = paths[i : i + _CHUNK]
        recorded.update(session.scalars(select(Instance.path).where(Instance.path.in_(chunk))))
    return [p for p in paths if p not in recorded]


def quarantine_unrecorded(
    store: InstanceStore, sessions: sessionmaker[Session], min_age_s: float = DEFAULT_MIN_AGE_S
) -> list[Quarantined]:
    """Move every store file without a database row, older than ``min_age_s``, to quarantine."""
    with sessions() as session:
        orphans = unrecorded_files(session, store_files(store))
    cutoff = time.time() - min_age_s
    moved = []
    for path in orphans:
        source = store.root / path
        try:
            if source.stat().st_mtime > cutoff:
                continue  # perhaps another node's write whose row commits any moment
        except FileNotFoundError:
            continue
        with sessions() as session:  # read again right before moving: the row may exist by now
            if unrecorded_files(session, [path]) != [path]:
                continue
        target = store.root / QUARANTINE / path
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, target)
        _fsync_dir(target.parent)
        _fsync_dir(source.parent)
        moved.append(Quarantined(path, f"{QUARANTINE}/{path}"))
        logger.warning("store file %s has no database row: moved to %s/%s", path, QUARANTINE, path)
    return moved


RECENT_ROWS = 1000


def rows_without_their_file(
    store: InstanceStore, sessions: sessionmaker[Session], recent: int = RECENT_ROWS
) -> list[Instance]:
    """Among the ``recent`` newest received rows, those whose file is missing or not its recorded size.

    The Storage SCP commits a row before the one flush that makes file and row durable
    (:mod:`storage.durability`), so a crash in between can leave the row on disk and the file not:
    an instance never acknowledged, that its sender will send again (the re-send stores the file
    again). Only the newest rows can be in that state; they are checked at start so an operator sees
    them, and nothing is changed.
    """
    with sessions() as session:
        rows = list(
            session.scalars(
                select(Instance).where(Instance.origin == "received").order_by(Instance.id.desc()).limit(recent)
            )
        )
    broken = []
    for row in rows:
        try:
            intact = (store.root / row.path).stat().st_size == row.size_bytes
        except OSError:
            intact = False
        if not intact:
            broken.append(row)
            logger.error(
                "instance %d (%s) is recorded but its file %s is missing or short: received just before a "
                "crash, never acknowledged; a re-send from its sender stores it again",
                row.id,
                row.sop_instance_uid,
                row.path,
            )
    return broken


def quarantined_files(store: InstanceStore) -> list[str]:
    """Relative paths (under the store root) of the files in quarantine."""
    folder = store.root / QUARANTINE
    if not folder.is_dir():
        return []
    return sorted(p.relative_to(store.root).as_posix() for p in folder.rglob("*") if p.is_file())


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
