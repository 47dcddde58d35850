"""The Storage SCP's durable flush (storage/durability.py) through real associations.

Success must follow a completed ``syncfs`` of the store's filesystem: checked in the kernel's own
record of the node's system calls (strace attached to this process while dcmtk storescu sends). A
row whose file a crash left missing or short is repaired by the re-send, never acknowledged as is.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from dicomnode.errors import StorageError
from dicomnode.group_commit import GroupCommitter
from storage.db import make_engine, session_factory, upgrade
from storage.durability import FilesystemFlush, FlushError, syncfs_supported
from storage.models import Instance
from tests.conftest import received_row
from tests.dicom_nodes import AE_TITLE, CALLING, Node, dcmtk_run, node_factory, pydicom_file, wait_until

pytestmark = pytest.mark.skipif(not syncfs_supported(), reason="needs Linux >= 5.8 (syncfs reporting errors)")


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    with node_factory(tmp_path) as start:
        yield start()


def _copies(folder: Path, n: int) -> list[Path]:
    """``n`` copies of a real CR file, each with its own SOP Instance UID."""
    folder.mkdir()
    ds = pydicom.dcmread(pydicom_file("RG1_UNCR.dcm"))
    paths = []
    for i in range(n):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"1.2.826.0.1.3680043.8.498.77{i}"
        paths.append(folder / f"{i}.dcm")
        ds.save_as(paths[-1])
    return paths


def _storescu(node: Node, *paths: Path) -> subprocess.CompletedProcess[str]:
    return dcmtk_run("storescu", "-aet", CALLING, "-aec", AE_TITLE, "127.0.0.1", str(node.port), *map(str, paths))


def test_the_scp_commits_without_syncing_and_flushes_once_per_group(node: Node) -> None:
    ingest = node.scp._ingest
    assert ingest.flush is not None and ingest.flush.filesystems == 1  # store and SQLite file share one
    with ingest.sessions() as session:
        assert session.execute(text("PRAGMA synchronous")).scalar() == 1  # NORMAL: the flush syncs
    with node.sessions() as session:
        assert session.execute(text("PRAGMA synchronous")).scalar() == 2  # FULL for every other writer


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_every_success_follows_a_completed_syncfs(node: Node, tmp_path: Path) -> None:
    files = _copies(tmp_path / "in", 4)
    trace = tmp_path / "trace.txt"
    tracer = subprocess.Popen(
        ["strace", "-f", "-qq", "-e", "trace=syncfs,fsync,fdatasync,sendto", "-o", str(trace), "-p", str(os.getpid())],
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: trace.exists() and tracer.poll() is None, 10)
        time.sleep(0.5)  # attached to every thread
        result = _storescu(node, *files)
    finally:
        tracer.terminate()
        tracer.wait(10)
    assert result.returncode == 0, result.stderr
    assert len(node.instances()) == 4
    events = []  # completed calls in the order the kernel returned them
    for line in trace.read_text().splitlines():
        if re.search(r"syncfs\(.*= 0$", line) or re.search(r"<\.\.\. syncfs resumed>.*= 0$", line):
            events.append("syncfs")
        elif re.search(r"\bf(data)?sync\(|<\.\.\. f(data)?sync resumed>", line) and "= 0" in line:
            events.append("fsync")
        elif re.search(r'sendto\(\d+, "\\4\\0', line):  # a P-DATA-TF PDU: here, a C-STORE response
            events.append("response")
    responses = [i for i, e in enumerate(events) if e == "response"]
    assert len(responses) == 4, events
    previous = 0
    for i in responses:
        assert "syncfs" in events[previous:i], f"a response without a flush before it: {events}"
        previous = i
    # The first instance makes the day folders (each synced once) and opens the WAL; after that the
    # flush is the only sync per instance (SQLite syncs again only at a checkpoint, every ~1000 pages).
    assert "fsync" not in events[responses[0] : responses[-1]], events


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_resend_replaces_a_recorded_file_a_crash_left_missing_or_short(
    node: Node, tmp_path: Path, damage: str
) -> None:
    (path,) = _copies(tmp_path / "in", 1)
    assert _storescu(node, path).returncode == 0
    (row,) = node.instances()
    held = node.store.absolute(row.path)
    original = held.read_bytes()
    if damage == "missing":  # what a crash before the flush can leave: the row reached the disk, the file not
        held.unlink()
    else:
        held.write_bytes(original[: len(original) // 2])
    flushes = node.scp._ingest.flush.flushes
    assert _storescu(node, path).returncode == 0
    (repaired,) = node.instances()
    assert repaired.id == row.id and repaired.path != row.path
    assert node.store.read(repaired.path) == original
    assert not held.exists() and len(node.files()) == 1
    assert node.scp._ingest.flush.flushes > flushes  # answered after a flush


def test_an_identical_resend_of_an_intact_file_is_flushed_and_keeps_one_file(node: Node, tmp_path: Path) -> None:
    (path,) = _copies(tmp_path / "in", 1)
    assert _storescu(node, path).returncode == 0
    flushes = node.scp._ingest.flush.flushes
    assert _storescu(node, path).returncode == 0
    assert len(node.instances()) == 1 and len(node.files()) == 1
    assert node.scp._ingest.flush.flushes > flushes


# ---- the pieces -------------------------------------------------------------------------------------


def test_filesystem_flush_syncs_each_filesystem_once(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    flush = FilesystemFlush([tmp_path / "a", tmp_path / "b", tmp_path])
    try:
        assert flush.filesystems == 1
        flush()
        flush()
        assert flush.flushes == 2
    finally:
        flush.close()
    with pytest.raises(StorageError, match="cannot open"):
        FilesystemFlush([tmp_path / "missing"])


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="needs a second filesystem (/dev/shm)")
def test_a_database_on_another_filesystem_is_flushed_too(tmp_path: Path) -> None:
    assert os.stat("/dev/shm").st_dev != os.stat(tmp_path).st_dev
    flush = FilesystemFlush([tmp_path, Path("/dev/shm")])
    try:
        assert flush.filesystems == 2
        flush()
        assert flush.flushes == 1
    finally:
        flush.close()


def _committer(tmp_path: Path, flush: Callable[[], None]) -> GroupCommitter:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    return GroupCommitter(session_factory(make_engine(url, synchronous="NORMAL")), flush)


def test_a_group_is_flushed_once_before_any_of_its_units_returns(tmp_path: Path) -> None:
    flush = FilesystemFlush([tmp_path])
    committer = _committer(tmp_path, flush)
    release, returned = threading.Event(), []

    def slow(session: Session) -> Instance:
        release.wait(5)
        return received_row(session, "1.9")

    def one(uid: str) -> None:
        committer.run(lambda s: received_row(s, uid), durable=True)
        returned.append(flush.flushes)

    first = threading.Thread(target=lambda: committer.run(slow, durable=True))
    first.start()
    time.sleep(0.2)
    threads = [threading.Thread(target=one, args=(f"1.2.{i}",)) for i in range(5)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    release.set()
    for t in [first, *threads]:
        t.join(10)
    assert (committer.batches, committer.largest) == (2, 5)
    assert flush.flushes == 2 and returned == [2] * 5  # one flush for the five, done before each returned
    committer.run(lambda s: received_row(s, "1.3"))  # not durable: no flush asked
    assert flush.flushes == 2
    flush.close()


def test_a_failed_flush_fails_its_units_but_keeps_their_rows(tmp_path: Path) -> None:
    def failing() -> None:
        raise FlushError("syncfs of the filesystem of /store failed: Input/output error")

    committer = _committer(tmp_path, failing)
    with pytest.raises(FlushError):
        committer.run(lambda s: received_row(s, "1.2.1"), durable=True)
    with committer.sessions() as session:
        assert session.query(Instance).count() == 1
