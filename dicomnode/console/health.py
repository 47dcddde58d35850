"""Liveness and readiness: ``/healthz`` says the process answers, ``/readyz`` whether it can do its job.

Ready means: the database answers, the store is writable and above its free-space watermark
(``node.min_free_mb``, the level below which C-STORE answers 0xA700), and the SCP is listening.
The model is reported as well; a missing model does not make the node unready, since it still
receives and queues (the reason it waits is given).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.config import Settings
from storage.store import InstanceStore


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def _database(sessions: sessionmaker[Session]) -> Check:
    try:
        with sessions() as session:
            session.execute(text("SELECT 1"))
    except Exception as e:  # any driver error means "not reachable"
        return Check("database", False, f"not reachable: {type(e).__name__}: {e}")
    return Check("database", True, "reachable")


def _store(settings: Settings, store: InstanceStore) -> Check:
    folder = settings.node.storage_dir
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".readyz-")
        os.close(fd)
        os.unlink(tmp)
        free = store.free_bytes()
    except OSError as e:
        return Check("store", False, f"{folder} not writable: {e}")
    watermark = settings.node.min_free_mb * 2**20
    if free < watermark:
        return Check(
            "store", False, f"{free // 2**20} MiB free, below the watermark of {settings.node.min_free_mb} MiB"
        )
    return Check("store", True, f"writable, {free // 2**20} MiB free (watermark {settings.node.min_free_mb} MiB)")


def readiness(
    settings: Settings,
    sessions: sessionmaker[Session],
    store: InstanceStore,
    scp_listening: Callable[[], bool],
    model_problem: Callable[[], str | None],
) -> list[Check]:
    """Every readiness check; the node is ready when all are ok."""
    listening = scp_listening()
    problem = model_problem()
    return [
        _database(sessions),
        _store(settings, store),
        Check("scp", listening, "listening" if listening else "not listening"),
        Check("model", True, problem or "present"),
    ]
