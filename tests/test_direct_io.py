"""Files written around the page cache (O_DIRECT): the same bytes as a buffered write."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from storage import direct_io
from storage.store import InstanceStore

PREAMBLE = bytes(128) + b"DICM"

pytestmark = pytest.mark.skipif(not direct_io.supported(), reason="no O_DIRECT on this platform")


@pytest.mark.parametrize(
    "sizes",
    [
        (0,),
        (1,),
        (4095,),
        (4096,),
        (4097,),
        (direct_io.CHUNK - 1,),
        (direct_io.CHUNK,),
        (direct_io.CHUNK + 1,),
        (300, direct_io.CHUNK * 3 + 5),  # a header, then a data set spanning several chunks
        (200, 0, 4096, 7),
    ],
)
def test_parts_are_written_whole(tmp_path: Path, sizes: tuple[int, ...]) -> None:
    parts = tuple(os.urandom(n) for n in sizes)
    path = tmp_path / "f"
    fd = direct_io.open_direct(path)
    assert fd is not None, "this filesystem refuses O_DIRECT"
    try:
        written = direct_io.write_parts(fd, tuple(memoryview(p) for p in parts))
    finally:
        os.close(fd)
    whole = b"".join(parts)
    assert written == len(whole)
    assert path.read_bytes() == whole


def test_the_store_writes_direct_and_falls_back_where_the_filesystem_refuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    data = PREAMBLE + os.urandom(512 * 512 * 2 + 333)
    store = InstanceStore(tmp_path / "direct", 0)
    stored = store.write((data[:500], memoryview(data)[500:]), sync=False)
    assert store.direct
    assert store.read(stored.path) == data and stored.sha256 == hashlib.sha256(data).hexdigest()

    refusing = InstanceStore(tmp_path / "buffered", 0)
    monkeypatch.setattr(direct_io, "open_direct", lambda path, mode=0o640: None)  # what EINVAL gives
    caplog.set_level(logging.INFO, logger="storage.store")
    for _ in range(2):
        again = refusing.write(data, sync=True)
        assert refusing.read(again.path) == data and again.sha256 == stored.sha256
    assert not refusing.direct
    assert sum("refuses O_DIRECT" in r.getMessage() for r in caplog.records) == 1
    assert not [p for p in (tmp_path / "buffered").rglob("*") if p.name.startswith(".partial-")]


def test_a_filesystem_that_takes_o_direct_but_refuses_the_writes_gets_buffered_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = PREAMBLE + os.urandom(100_000)

    def refuse(fd: int, parts: tuple[bytes | memoryview, ...]) -> int:
        os.write(fd, bytes(4096))  # a first block got through, as it may have
        raise OSError(errno.EINVAL, "Invalid argument")

    store = InstanceStore(tmp_path, 0)
    monkeypatch.setattr(direct_io, "write_parts", refuse)
    stored = store.write((data[:200], data[200:]), sync=False)
    assert not store.direct
    assert store.read(stored.path) == data and stored.sha256 == hashlib.sha256(data).hexdigest()


def test_concurrent_writes_each_get_their_own_buffer(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path, 0)
    datas = [PREAMBLE + os.urandom(direct_io.CHUNK + 1000 * i) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        placed = list(pool.map(lambda data: store.place((data,), sync=False), datas * 3))
    assert [store.read(p.path) for p in placed] == datas * 3
    assert len(direct_io._free) <= 8  # one buffer per write under way, kept for the next
