"""The durable instance store: DICOM files on disk, written so that none is ever half there.

A C-STORE is acknowledged with success only once the instance is on disk and recorded (PS3.4
B.2.3 leaves what "stored" means to the SCP; we take it to mean durable). ``write`` therefore:
checks the free-space watermark, writes a temporary file in the destination folder, flushes and
fsyncs it, renames it atomically onto its final name and fsyncs the folder so the rename itself
survives a power cut. With ``sync=False`` the caller takes that over: the Storage SCP writes and
renames without syncing, then flushes the whole filesystem once, after the commit, for all the
instances committed with it (:mod:`storage.durability`). Final names are generated
(``yyyy/mm/dd/<uuid4>.dcm``), never taken from a UID or any other received value, so no peer can
choose a path in our tree.
"""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import os
import re
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from dicomnode.errors import DicomInputError, StorageError
from storage import direct_io
from storage.durability import start_writeback

logger = logging.getLogger(__name__)

TEMP_PREFIX = ".partial-"
SUFFIX = ".dcm"
PREAMBLE_LENGTH = 128
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class PlacedFile:
    """A file :meth:`InstanceStore.place` wrote: where (relative POSIX path) and how many bytes."""

    path: str
    size_bytes: int


@dataclass(frozen=True)
class StoredFile:
    """Where an instance now lies in the store (a relative POSIX path) and what it holds."""

    path: str
    sha256: str
    size_bytes: int

    def __post_init__(self) -> None:
        relative = PurePosixPath(self.path)
        if relative.is_absolute() or ".." in relative.parts or not self.path:
            raise ValueError(f"stored path {self.path!r} must be relative to the store root")
        if not _SHA256.fullmatch(self.sha256):
            raise ValueError(f"sha256 {self.sha256!r} is not 64 lowercase hex digits")
        if self.size_bytes < 0:
            raise ValueError(f"size_bytes {self.size_bytes} is negative")


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, parts: tuple[bytes | memoryview, ...]) -> None:
    """Write ``parts`` in order, resuming after short writes."""
    views = [memoryview(part) for part in parts if part]
    while views:
        written = os.writev(fd, views)
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if views and written:
            views[0] = views[0][written:]


def _check_part10(data: bytes | memoryview) -> None:
    """A Part 10 file: 128-byte preamble, then "DICM" (PS3.10 7.1); the store holds nothing else."""
    if data[PREAMBLE_LENGTH : PREAMBLE_LENGTH + 4] != b"DICM":
        raise DicomInputError(f"not a DICOM Part 10 file ({len(data)} bytes, no 'DICM' prefix after the preamble)")


class InstanceStore:
    """DICOM files under ``root``, refusing new writes when free space drops below a watermark.

    ``min_free_bytes`` is the space (bytes) that must remain free on the filesystem after a write;
    below it the store refuses, so the database, logs and the OS never run out of room.
    """

    def __init__(self, root: Path, min_free_bytes: int) -> None:
        if min_free_bytes < 0:
            raise ValueError(f"min_free_bytes {min_free_bytes} is negative")
        self.root = Path(root).expanduser().absolute()
        self.min_free_bytes = min_free_bytes
        self.direct = direct_io.supported()  # cleared when the filesystem refuses O_DIRECT
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError(f"cannot create the store root {self.root}: {e}") from e

    def __repr__(self) -> str:
        return f"InstanceStore(root={str(self.root)!r}, min_free_bytes={self.min_free_bytes})"

    def free_bytes(self) -> int:
        """Bytes an unprivileged writer may still use on the store's filesystem."""
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def write(self, data: bytes | tuple[bytes | memoryview, ...] | Dataset, sync: bool = True) -> StoredFile:
        """Store one Part 10 file (encoded bytes, or a dataset with file meta) durably.

        ``data`` may come in parts (a tuple: preamble and File Meta Information, then the data set), written
        one after the other, so a large data set is never joined in memory. Where the filesystem allows,
        the bytes go around the page cache (:mod:`storage.direct_io`), else through it with ``writev``.

        ``sync=False`` skips the fsyncs of the file and its folders: the file is complete and in place
        but durable only after a flush of its filesystem (:class:`storage.durability.FilesystemFlush`),
        which the caller must make before it tells anyone the file is stored.

        Raises ``StorageError`` when free space would fall below the watermark or any step of the
        write fails; in both cases neither a temporary nor a final file is left behind.
        """
        if isinstance(data, Dataset):
            return self.write_dataset(data)  # durable step by step, as every writer but the SCP
        parts = data if isinstance(data, tuple) else (bytes(data),)
        placed = self._place(parts, sync)
        digest = hashlib.sha256()
        for part in parts:
            digest.update(part)
        stored = StoredFile(placed.path, digest.hexdigest(), placed.size_bytes)
        logger.debug("stored %d bytes at %s", stored.size_bytes, stored.path)
        return stored

    def place(self, parts: tuple[bytes | memoryview, ...], sync: bool = True) -> PlacedFile:
        """:meth:`write` without the hash: for a caller that hashes the bytes itself meanwhile (the
        Storage SCP, on its association thread while this runs on another)."""
        return self._place(parts, sync)

    def _place(self, parts: tuple[bytes | memoryview, ...], sync: bool) -> PlacedFile:
        """Write ``parts`` into a new file and move it to its final name (:meth:`write`)."""
        _check_part10(parts[0])
        size = sum(len(part) for part in parts)
        free = self.free_bytes()
        if free - size < self.min_free_bytes:
            raise StorageError(
                f"store {self.root} is full: {free} bytes free, writing {size} would leave less "
                f"than the {self.min_free_bytes} bytes watermark"
            )
        now = datetime.now(UTC)
        relative = PurePosixPath(f"{now:%Y}", f"{now:%m}", f"{now:%d}", f"{uuid.uuid4().hex}{SUFFIX}")
        final = self.root.joinpath(*relative.parts)
        temp = final.with_name(f"{TEMP_PREFIX}{uuid.uuid4().hex}")
        renamed = False
        try:
            self._make_folders(final.parent)  # synced always: once a day, and other writers rely on it
            fd = direct_io.open_direct(temp) if self.direct else None
            direct = fd is not None
            if fd is None:
                if self.direct:
                    self.direct = False
                    logger.info("%s refuses O_DIRECT: files are written through the page cache", self.root)
                fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            try:
                if direct:
                    direct = self._write_direct(fd, temp, parts)
                if not direct:
                    _write_all(fd, parts)
                if sync:
                    os.fsync(fd)
                elif not direct:
                    start_writeback(fd)
            finally:
                os.close(fd)
            os.replace(temp, final)
            renamed = True
            if sync:
                _fsync_directory(final.parent)
        except OSError as e:
            leftover = final if renamed else temp
            try:
                leftover.unlink(missing_ok=True)
            except OSError:
                logger.exception("could not remove %s after a failed write", leftover)
            raise StorageError(f"writing {size} bytes under {self.root} failed: {e}") from e
        return PlacedFile(str(relative), size)

    def _write_direct(self, fd: int, temp: Path, parts: tuple[bytes | memoryview, ...]) -> bool:
        """Write ``parts`` direct; False (``fd`` emptied, buffered from now on) where a filesystem that
        took ``O_DIRECT`` at open refuses the writes (``EINVAL``)."""
        try:
            direct_io.write_parts(fd, parts)
            return True
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
        self.direct = False
        logger.info("%s refuses O_DIRECT writes: files are written through the page cache", self.root)
        direct_io.clear_direct(fd)
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        return False

    def write_dataset(self, ds: Dataset) -> StoredFile:
        """Encode ``ds`` with its File Meta Information (PS3.10 7.1) and store it."""
        buffer = io.BytesIO()
        try:
            ds.save_as(buffer, enforce_file_format=True)
        except (AttributeError, ValueError, TypeError) as e:
            uid = ds.get("SOPInstanceUID", "?")
            raise DicomInputError(f"dataset {uid} cannot be encoded as a Part 10 file: {e}") from e
        return self.write(buffer.getvalue())

    def absolute(self, path: str) -> Path:
        """The absolute location of a stored relative ``path``; refuses anything outside the root."""
        relative = PurePosixPath(path)
        if not path or relative.is_absolute() or ".." in relative.parts:
            raise StorageError(f"path {path!r} is not a relative path inside the store {self.root}")
        return self.root.joinpath(*relative.parts)

    def read(self, path: str) -> bytes:
        """The stored bytes at ``path``."""
        location = self.absolute(path)
        try:
            return location.read_bytes()
        except OSError as e:
            raise StorageError(f"cannot read stored file {path!r} under {self.root}: {e}") from e

    def open_dataset(self, path: str) -> Dataset:
        """The stored file at ``path``, parsed (pixel data is decoded only when accessed)."""
        location = self.absolute(path)
        try:
            return pydicom.dcmread(location)
        except OSError as e:
            raise StorageError(f"cannot read stored file {path!r} under {self.root}: {e}") from e
        except InvalidDicomError as e:
            raise StorageError(f"stored file {path!r} under {self.root} is not valid DICOM: {e}") from e

    def discard_partial_files(self, min_age_s: float = 0.0) -> int:
        """Remove temporary files a crash left mid-write; run at start, before accepting stores.

        They were never acknowledged nor recorded, so nothing refers to them. ``min_age_s`` spares
        younger ones: on a store shared by several nodes, another node may be writing them now.
        """
        removed = 0
        cutoff = time.time() - min_age_s
        for leftover in self.root.rglob(f"{TEMP_PREFIX}*"):
            try:
                if min_age_s and leftover.stat().st_mtime > cutoff:
                    continue
                leftover.unlink()
                removed += 1
            except FileNotFoundError:
                continue  # another node removed or renamed it meanwhile
            except OSError as e:
                raise StorageError(f"cannot remove partial file {leftover}: {e}") from e
        if removed:
            logger.warning("removed %d partial files left by an interrupted write under %s", removed, self.root)
        return removed

    def _make_folders(self, folder: Path) -> None:
        """Create ``folder`` and missing parents, fsyncing each parent so the new entries persist."""
        missing: list[Path] = []
        current = folder
        while not current.exists() and current != self.root:
            missing.append(current)
            current = current.parent
        for created in reversed(missing):
            try:
                created.mkdir()
            except FileExistsError:
                continue  # another writer made it first: it is there, which is all we need
            _fsync_directory(created.parent)
