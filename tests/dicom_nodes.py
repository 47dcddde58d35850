"""Helpers for the network-edge tests: a real StorageSCP on a free loopback port, dcmtk, pydicom-data.

Both ``test_scp.py`` and ``test_scu.py`` start nodes through :func:`node_factory` from a fixture of
their own (fixtures imported from another test module would be registered twice).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pydicom.data import get_testdata_file
from pynetdicom.dsutils import split_dataset
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.config import PeerSettings, Settings, load_settings
from dicomnode.scp import Intake, StorageSCP
from storage.db import make_engine, session_factory, upgrade
from storage.models import Association, Instance
from storage.store import InstanceStore
from tests.conftest import dcmtk, free_port

AE_TITLE = "SVDRR"
CALLING = "TESTSCU"


def pydicom_file(name: str) -> Path:
    """A real DICOM file shipped by pydicom-data."""
    path = get_testdata_file(name)
    assert path is not None, f"pydicom-data lacks {name}"
    return Path(path)


def write_settings(folder: Path, port: int, security: str = "", node: str = "") -> Settings:
    """Settings from a real TOML file, with a migrated SQLite database in ``folder``."""
    config = folder / "dicomnode.toml"
    defaults = "".join(  # the test defaults, unless ``node`` sets them itself
        f"{key} = {value}\n"
        for key, value in (("acse_timeout_s", 5), ("dimse_timeout_s", 10), ("network_timeout_s", 10))
        if f"{key} =" not in node
    )
    config.write_text(
        f"""
[node]
ae_title = "{AE_TITLE}"
bind_address = "127.0.0.1"
port = {port}
storage_dir = "{folder / "var"}"
min_free_mb = 0
{defaults}{node}

[security]
allowed_calling_ae_titles = ["{CALLING}", "STORESCU", "ECHOSCU"]
{security}
"""
    )
    settings = load_settings(config, env={})
    upgrade(settings.node.effective_database_url)
    return settings


@dataclass
class Node:
    """A running StorageSCP with the store and database it writes to."""

    settings: Settings
    store: InstanceStore
    sessions: sessionmaker[Session]
    scp: StorageSCP

    @property
    def port(self) -> int:
        return self.scp.port

    def peer(self, ae_title: str = AE_TITLE) -> PeerSettings:
        return PeerSettings(name="node", ae_title=ae_title, host="127.0.0.1", port=self.port)

    def instances(self) -> list[Instance]:
        with self.sessions() as session:
            return list(session.scalars(select(Instance).order_by(Instance.id)))

    def associations(self) -> list[Association]:
        with self.sessions() as session:
            return list(session.scalars(select(Association).order_by(Association.id)))

    def files(self) -> list[Path]:
        return sorted(self.store.root.rglob("*.dcm"))


@contextmanager
def node_factory(folder: Path) -> Iterator[Callable[..., Node]]:
    """``start(intake=None, min_free_bytes=0, security="", node="")`` starts a node; all stop on exit.

    ``security`` and ``node`` are TOML lines added to those sections.
    """
    started: list[StorageSCP] = []

    def start(intake: Intake | None = None, min_free_bytes: int = 0, security: str = "", node: str = "") -> Node:
        settings = write_settings(folder, free_port(), security, node)
        store = InstanceStore(settings.node.storage_dir / "instances", min_free_bytes)
        sessions = session_factory(make_engine(settings.node.effective_database_url))
        scp = StorageSCP(settings, store, sessions, intake)
        scp.start()
        started.append(scp)
        return Node(settings, store, sessions, scp)

    try:
        yield start
    finally:
        for scp in started:
            scp.stop(timeout_s=5)


def dcmtk_run(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run a dcmtk tool with Nagle off (real-peers.md)."""
    return subprocess.run(
        [dcmtk(tool), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "TCP_NODELAY": "1"},
    )


def wait_until(predicate: Callable[[], bool], timeout_s: float = 5) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def body_of(path: Path) -> bytes:
    """The data set of a Part 10 file, without preamble and File Meta Information."""
    _, offset = split_dataset(path)
    return path.read_bytes()[offset:]
