"""Everything the node does on a timer, in one place.

=============  ==========================  ======  ==============================================
timer          every                       roles   what
=============  ==========================  ======  ==============================================
settle         (no timer)                  edge    a job is queued with ``not_before = now +
                                                   settle_s`` and pushed back while its study
                                                   keeps arriving (:mod:`dicomnode.intake`);
                                                   workers poll for due jobs every
                                                   ``poll_interval_s``
supervise      ``max(poll_interval_s, 1)``  worker  restart dead synthesis workers (their job
                                                   counts a failed attempt); release jobs that
                                                   waited for a model once it is there
deliver        ``poll_interval_s``         edge    claim due deliveries with a lease and send
                                                   them (:mod:`dicomnode.delivery`)
reclaim        ``lease_s / 3``             all     take back jobs and deliveries whose lease ran
                                                   out, whichever node or host held them
heartbeat      ``lease_s / 3``             all     record that this node is alive (``status``)
cleanup        ``cleanup_interval_s``      edge    remove partial files and quarantine files
                                                   without a database row, both old enough that
                                                   no writer can still be busy with them
=============  ==========================  ======  ==============================================

"all" also runs every timer of "edge" and "worker". Each timer body is a boundary: an exception is
logged and the timer runs again at its next tick.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from apscheduler.schedulers.background import BackgroundScheduler

logger = logging.getLogger(__name__)

ROLES: tuple[str, ...] = ("all", "edge", "worker")
CLEANUP_INTERVAL_S = 600.0


@dataclass(frozen=True)
class Timer:
    """One periodic task: its name, its period and the roles that run it."""

    name: str
    every_s: float
    run: Callable[[], object]
    roles: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.every_s <= 0:
            raise ValueError(f"timer {self.name}: period {self.every_s} s must be > 0")
        unknown = set(self.roles) - set(ROLES)
        if unknown:
            raise ValueError(f"timer {self.name}: unknown roles {sorted(unknown)}")

    def runs_in(self, role: str) -> bool:
        return role == "all" or role in self.roles or "all" in self.roles


class Scheduler:
    """The timers of one role, run by APScheduler threads (one run of each timer at a time)."""

    def __init__(self, timers: list[Timer], role: str):
        if role not in ROLES:
            raise ValueError(f"role {role!r} is not one of {', '.join(ROLES)}")
        self.role = role
        self.timers = [t for t in timers if t.runs_in(role)]
        self._aps = BackgroundScheduler(timezone="UTC")
        for timer in self.timers:
            self._aps.add_job(
                _guarded(timer), "interval", seconds=timer.every_s, id=timer.name, max_instances=1, coalesce=True
            )

    def start(self) -> None:
        self._aps.start()
        logger.info(
            "scheduler (%s): %s", self.role, ", ".join(f"{t.name} every {t.every_s:g} s" for t in self.timers)
        )

    def shutdown(self) -> None:
        """Stop the timers, waiting for runs in progress."""
        self._aps.shutdown(wait=True)

    def run_now(self, name: str) -> None:
        """Run one timer's body once, here (start-up and tests)."""
        for timer in self.timers:
            if timer.name == name:
                _guarded(timer)()
                return
        raise KeyError(f"no timer {name!r} in role {self.role} ({', '.join(t.name for t in self.timers)})")


def _guarded(timer: Timer) -> Callable[[], None]:
    def run() -> None:
        try:
            timer.run()
        except Exception:  # a timer is a boundary: log, run again next tick
            logger.exception("%s round failed", timer.name)

    return run
