"""One durable flush for a group of received instances: ``syncfs(2)`` of the filesystems they are on.

The C-STORE acknowledgement promises that the file, its folder entry and its database row survive a
power cut (PS3.4 B.2.3 leaves "stored" to the SCP). Made step by step that costs three synchronous
flushes per instance (fsync of the file, fsync of its folder after the rename, the SQLite WAL sync of
the commit), each a journal commit and a device cache flush. Here it costs one per *group*:

1. the file is written to a temporary name and renamed onto its final name, both without syncing;
2. the row is committed in SQLite's WAL mode with ``synchronous = NORMAL``: the WAL frames are
   written to the operating system (``write``) but not synced;
3. ``syncfs`` of every filesystem holding the store and the SQLite database, once for all the
   instances committed together (:class:`dicomnode.group_commit.GroupCommitter`);
4. only then Success.

Linux's ``syncfs`` waits until all dirty data and metadata of the filesystem are on stable storage,
the same guarantee as ``fsync`` of every file on it (syncfs(2): "Linux waits for I/O completions"),
so after step 3 the file's data, the rename's folder entry, new day folders and the WAL frames of the
commit are durable. Since Linux 5.8 it also reports write-back errors (``EIO``, ``ENOSPC``); before, it
always returned 0, so :func:`syncfs_supported` refuses older kernels, as it refuses systems without
``syncfs`` at all; there the store and the database fall back to the step-by-step syncs.

PostgreSQL makes its own commits durable (server ``fsync``); then only the store's filesystem is
flushed. A database on another filesystem than the store is flushed with its own ``syncfs``.

What a crash *before* step 3 returns can leave, besides nothing: a complete file without a row (moved
to quarantine at start, :mod:`storage.reconcile`), or, since the WAL may reach the disk before the
file (a checkpoint syncs it), a row whose file is missing or short. Neither was acknowledged, so a sender
that wants it stored sends it again; the SCP then verifies the held file and, if it is not the recorded bytes,
records the new copy in its place (``StorageSCP._answer_resend``); at start the node logs such rows
(:func:`storage.reconcile.rows_without_their_file`). The cost: ``syncfs`` also flushes
what other programs wrote to the same filesystem, so the store belongs on a filesystem that bulk
writers (training checkpoints, backups) do not share.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.errors import StorageError
from storage.db import make_engine, session_factory, sqlite_file

logger = logging.getLogger(__name__)

MIN_KERNEL = (5, 8)  # syncfs reports write-back errors from this release on


class FlushError(StorageError):
    """The flush after a commit failed: the rows are committed, but not known to be durable."""


def _kernel_release() -> tuple[int, int]:
    parts = platform.release().split(".")
    try:
        return int(parts[0]), int(parts[1].split("-")[0])
    except (IndexError, ValueError):
        return 0, 0


def _libc(function_name: str, argtypes: list[type]) -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    if platform.system() != "Linux":
        return None
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        function = getattr(libc, function_name)
    except (OSError, AttributeError, TypeError):
        return None
    function.argtypes = argtypes
    function.restype = ctypes.c_int
    return function  # type: ignore[no-any-return]


_SYNCFS = _libc("syncfs", [ctypes.c_int])
_SYNC_FILE_RANGE = _libc("sync_file_range", [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint])
SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int) -> None:
    """Ask the kernel to start writing ``fd``'s dirty pages now, without waiting (Linux).

    Only a head start: nothing is promised until the flush, which then finds the file's data written
    or under way (it was written while the instance was checked and recorded) and waits less.
    """
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, 0, 0, SYNC_FILE_RANGE_WRITE)  # a failure here is the flush's to report


def syncfs_supported() -> bool:
    """Whether ``syncfs`` exists here and reports write-back errors (Linux 5.8 or later)."""
    return _SYNCFS is not None and _kernel_release() >= MIN_KERNEL


class FilesystemFlush:
    """``syncfs`` of every distinct filesystem holding one of ``folders``; call it to flush them all.

    Thread-safe. ``flushes`` counts completed calls (for tests and benchmarks).
    """

    def __init__(self, folders: Iterable[Path]) -> None:
        if not syncfs_supported():
            raise StorageError(f"syncfs is not available with reporting of errors here (Linux >= {MIN_KERNEL})")
        self._fds: dict[int, tuple[int, Path]] = {}
        for folder in folders:
            try:
                fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
            except OSError as e:
                self.close()
                raise StorageError(f"cannot open {folder} to flush its filesystem: {e}") from e
            device = os.fstat(fd).st_dev
            if device in self._fds:
                os.close(fd)
            else:
                self._fds[device] = (fd, Path(folder))
        self.flushes = 0
        self._lock = threading.Lock()

    @property
    def filesystems(self) -> int:
        """How many filesystems one call flushes."""
        return len(self._fds)

    def __call__(self) -> None:
        """Return once everything written to these filesystems is on stable storage, or raise."""
        assert _SYNCFS is not None
        for fd, folder in list(self._fds.values()):
            if _SYNCFS(fd) != 0:
                errno = ctypes.get_errno()
                raise FlushError(f"syncfs of the filesystem of {folder} failed: {os.strerror(errno)}")
        with self._lock:
            self.flushes += 1

    def close(self) -> None:
        fds, self._fds = list(self._fds.values()), {}
        for fd, _ in fds:
            os.close(fd)

    def __repr__(self) -> str:
        return f"FilesystemFlush({[str(folder) for _, folder in self._fds.values()]})"


@dataclass
class IngestCommit:
    """How the Storage SCP commits received instances: the sessions it commits with and its flush.

    ``flush`` None: the step-by-step syncs (file, folder, ``synchronous = FULL`` commit) make each
    instance durable on their own.
    """

    sessions: sessionmaker[Session]
    flush: FilesystemFlush | None = None
    engine: Engine | None = None  # owned (the SQLite engine with synchronous = NORMAL)

    def close(self) -> None:
        if self.flush is not None:
            self.flush.close()
        if self.engine is not None:
            self.engine.dispose()


def ingest_commit(store_root: Path, sessions: sessionmaker[Session]) -> IngestCommit:
    """The cheapest durable way to commit received instances into ``store_root`` and ``sessions``' database.

    One ``syncfs`` per group of commits where the system supports it (module docstring), else the
    step-by-step syncs. For SQLite the returned sessions use their own engine, with ``synchronous =
    NORMAL``; ``sessions`` and everyone else's commits keep ``FULL``.
    """
    engine = sessions.kw.get("bind")
    if not syncfs_supported() or not isinstance(engine, Engine):
        logger.info("received instances are synced step by step (syncfs unavailable)")
        return IngestCommit(sessions)
    url = engine.url
    if url.get_backend_name() != "sqlite":  # PostgreSQL: each commit is durable on the server
        return IngestCommit(sessions, FilesystemFlush([store_root]))
    database = sqlite_file(url)
    if database is None:  # in memory: nothing to flush, the files still are
        return IngestCommit(sessions, FilesystemFlush([store_root]))
    flush = FilesystemFlush([store_root, database.absolute().parent])
    own = make_engine(url.render_as_string(hide_password=False), synchronous="NORMAL")
    logger.info("received instances are made durable by one syncfs per group of commits (%d filesystem(s))",
                flush.filesystems)
    return IngestCommit(session_factory(own), flush, own)
