"""Group commit on a real SQLite file: units queued behind a running commit share the next one, and a
failing unit fails alone."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from dicomnode.group_commit import GroupCommitter
from storage.db import make_engine, session_factory, upgrade
from storage.models import Instance
from tests.conftest import received_row


@pytest.fixture
def committer(tmp_path: Path) -> GroupCommitter:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    return GroupCommitter(session_factory(make_engine(url)))


def _count(committer: GroupCommitter) -> int:
    with committer.sessions() as session:
        return int(session.scalar(select(func.count()).select_from(Instance)) or 0)


def _run_behind_a_slow_unit(committer: GroupCommitter, uids: list[str]) -> dict[str, object]:
    """The first unit holds the commit until all others are queued; returns each uid's result."""
    results: dict[str, object] = {}
    release = threading.Event()

    def slow(session: Session) -> Instance:
        release.wait(5)
        return received_row(session, "1.9")

    def one(uid: str) -> None:
        try:
            work = (lambda s: (_ for _ in ()).throw(RuntimeError("intake broken"))) if uid == "bad" else None
            results[uid] = committer.run(work or (lambda s: received_row(s, uid)))
        except Exception as e:
            results[uid] = e

    first = threading.Thread(target=lambda: committer.run(slow))
    first.start()
    time.sleep(0.2)
    threads = [threading.Thread(target=one, args=(uid,)) for uid in uids]
    for t in threads:
        t.start()
    time.sleep(0.3)  # all queued behind the slow unit
    release.set()
    for t in [first, *threads]:
        t.join(10)
    return results


def test_units_queued_behind_a_commit_share_the_next_one(committer: GroupCommitter) -> None:
    uids = [f"1.2.{i}" for i in range(1, 6)]
    results = _run_behind_a_slow_unit(committer, uids)
    assert all(isinstance(results[uid], Instance) for uid in uids)
    assert _count(committer) == 6
    assert (committer.batches, committer.largest) == (2, 5)


def test_a_failing_unit_fails_alone(committer: GroupCommitter) -> None:
    uids = ["1.2.1", "bad", "1.2.3", "1.2.1"]  # the second 1.2.1 breaks the unique SOP Instance UID
    results = _run_behind_a_slow_unit(committer, uids[:3])
    assert isinstance(results["bad"], RuntimeError)
    assert isinstance(results["1.2.1"], Instance) and isinstance(results["1.2.3"], Instance)
    assert _count(committer) == 3
    with pytest.raises(Exception, match="1.2.1"):
        committer.run(lambda s: received_row(s, "1.2.1"))
    assert _count(committer) == 3
