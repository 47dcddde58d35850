"""Group commit: the rows written on concurrent associations (instances received, associations
opened and closed) share one transaction and one commit.

Each C-STORE is acknowledged only after its row is committed, and a durable commit costs an fsync
(SQLite ``synchronous = FULL``, PostgreSQL ``fsync``), which bounds one writer to a few hundred
commits a second whatever the number of associations. :class:`GroupCommitter` lets the threads of
concurrent associations hand their unit of work to whichever of them is committing next: the leader
runs every waiting unit in one transaction and commits once, then wakes them all. A lone association
commits alone, as before.

With a ``flush`` (:class:`storage.durability.FilesystemFlush`) the commit itself does not sync
(SQLite ``synchronous = NORMAL``): the leader calls ``flush`` once after committing the group, before
any of its units returns, so the rows of ``durable`` units, and the files their threads wrote before
handing them over, are on stable storage when ``run`` returns. A failed flush fails every durable
unit of the group (its row is committed, but not known to be durable: it must not be acknowledged).

Units stay independent: when the shared transaction fails, it is rolled back and each unit is run
again in a transaction of its own, so one failing instance (a duplicate, a failing intake) fails only
itself. A unit must therefore touch nothing but the session it is given.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sqlalchemy.orm import Session, sessionmaker

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class _Unit(Generic[T]):
    work: Callable[[Session], T]
    durable: bool = False
    done: bool = False
    value: Any = None
    error: BaseException | None = None


class GroupCommitter:
    """Runs units of work (``work(session) -> value``) in shared transactions, one commit per group."""

    def __init__(self, sessions: sessionmaker[Session], flush: Callable[[], None] | None = None) -> None:
        self.sessions = sessions
        self.flush = flush
        self._cond = threading.Condition()
        self._pending: list[_Unit[Any]] = []
        self._leading = False
        self.batches = 0  # groups committed (for tests and benchmarks)
        self.largest = 0  # most units in one group

    def run(self, work: Callable[[Session], T], durable: bool = False) -> T:
        """Run ``work`` in a committed transaction, possibly with others'; raise what it raised.

        ``durable``: also ``flush`` after the commit (when the committer has one) before returning.
        """
        unit: _Unit[T] = _Unit(work, durable)
        with self._cond:
            self._pending.append(unit)
            while self._leading and not unit.done:
                self._cond.wait()
            if not unit.done:
                self._leading = True
                batch, self._pending = self._pending, []
        if not unit.done:
            try:
                self._commit(batch)
            finally:
                for other in batch:  # only if _commit itself was interrupted
                    if not other.done:
                        other.error, other.done = RuntimeError("group commit interrupted"), True
                with self._cond:
                    self._leading = False
                    self._cond.notify_all()
        if unit.error is not None:
            raise unit.error
        return unit.value  # type: ignore[no-any-return]

    def _commit(self, batch: list[_Unit[Any]]) -> None:
        """Commit the batch, flush once if a committed unit asks for it, then mark every unit done."""
        self._run_batch(batch)
        waiting = [unit for unit in batch if unit.durable and unit.error is None]
        if self.flush is not None and waiting:
            try:
                self.flush()
            except Exception as e:  # each waiting thread answers for its own unit
                logger.error("flush after committing %d records failed: %s", len(waiting), e)
                for unit in waiting:
                    unit.error = e
        for unit in batch:
            unit.done = True

    def _run_batch(self, batch: list[_Unit[Any]]) -> None:
        self.batches += 1
        self.largest = max(self.largest, len(batch))
        if len(batch) > 1:
            try:
                with self.sessions.begin() as session:
                    values = [unit.work(session) for unit in batch]
            except Exception:
                logger.debug("a group of %d records failed; committing each on its own", len(batch))
            else:
                for unit, value in zip(batch, values, strict=True):
                    unit.value = value
                return
        for unit in batch:
            try:
                with self.sessions.begin() as session:
                    unit.value = unit.work(session)
            except Exception as e:  # handed to the unit's own thread, which decides the status
                unit.error = e
