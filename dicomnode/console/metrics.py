"""Prometheus metrics at ``/metrics``, correct however many worker processes there are.

Two sources feed one registry:

* :class:`ScpMetrics`: counters the Storage SCP updates in this (the main) process as an observer
  of both its paths (:class:`dicomnode.scp.ScpObserver`): associations by result, C-STORE
  responses by status (hex, as in PS3.7 Annex C), and data-set bytes received in C-STORE
  requests. They start at zero with the process, as Prometheus counters do.
* :class:`DatabaseCollector`: read from the database at scrape time, so work done by worker
  processes (or by other edges sharing the database) is counted exactly: jobs by state, job and
  per-view synthesis durations, deliveries by peer and result, free space, model identity.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from storage.models import Delivery, Job, Output
from storage.store import InstanceStore

logger = logging.getLogger(__name__)

JOB_BUCKETS: tuple[float, ...] = (1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
VIEW_BUCKETS: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)


class ScpMetrics:
    """The SCP's counters, registered in ``registry`` and fed by :meth:`bind`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.associations = Counter(
            "dicomnode_associations", "Associations requested of the SCP, by result", ["result"], registry=registry
        )
        self.cstore = Counter(
            "dicomnode_cstore_requests", "C-STORE requests answered, by status (hex)", ["status"], registry=registry
        )
        self.received_bytes = Counter(
            "dicomnode_received_bytes", "Bytes of data sets received in C-STORE requests", registry=registry
        )
        for result in ("accepted", "rejected"):
            self.associations.labels(result=result)
        self.cstore.labels(status="0x0000")

    def bind(self, scp: Any) -> None:
        """Attach to a running :class:`dicomnode.scp.StorageSCP` (anything with an ``observers`` list)."""
        scp.observers.append(self)

    def association(self, accepted: bool) -> None:
        self.associations.labels(result="accepted" if accepted else "rejected").inc()

    def c_store(self, status: int, data_set_bytes: int) -> None:
        self.cstore.labels(status=f"0x{status:04X}").inc()
        if data_set_bytes:
            self.received_bytes.inc(data_set_bytes)


def _histogram(name: str, doc: str, values: Iterable[float | None], buckets: Sequence[float]) -> HistogramMetricFamily:
    data = sorted(v for v in values if v is not None and v >= 0)
    counts, i = [], 0
    for bound in buckets:
        while i < len(data) and data[i] <= bound:
            i += 1
        counts.append((_bound(bound), float(i)))
    counts.append(("+Inf", float(len(data))))
    total = float(sum(data))
    return HistogramMetricFamily(name, doc, buckets=counts, sum_value=total)


def _bound(value: float) -> str:
    return str(float(value))


class DatabaseCollector(Collector):
    """Metrics computed from the database and the store at each scrape."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        store: InstanceStore,
        known_job_states: Sequence[str],
        model_identity: Callable[[], str | None],
    ) -> None:
        self.sessions = sessions
        self.store = store
        self.known_job_states = tuple(known_job_states)
        self.model_identity = model_identity

    def collect(self) -> Iterable[Metric]:
        try:
            yield from self._collect()
        except Exception:  # a scrape must not fail the whole registry; the log says why
            logger.exception("metrics: cannot read the database")

    def _collect(self) -> Iterable[Metric]:
        with self.sessions() as session:
            jobs = dict.fromkeys(self.known_job_states, 0)
            by_state = session.execute(select(Job.state, func.count()).group_by(Job.state))
            jobs.update({str(s): int(n) for s, n in by_state})
            spans = session.execute(
                select(Job.started_at, Job.finished_at).where(Job.state == "done", Job.finished_at.is_not(None))
            ).all()
            per_view = list(session.scalars(select(Output.synthesis_s).where(Output.synthesis_s.is_not(None))))
            deliveries = session.execute(
                select(Delivery.peer_name, Delivery.state, func.count()).group_by(Delivery.peer_name, Delivery.state)
            ).all()
        gauge = GaugeMetricFamily("dicomnode_jobs", "Synthesis jobs by state", labels=["state"])
        for state, n in sorted(jobs.items()):
            gauge.add_metric([state], n)
        yield gauge
        yield _histogram(
            "dicomnode_job_duration_seconds",
            "Time from a job's start to its finish, for finished jobs",
            ((end - start).total_seconds() for start, end in spans if start and end),
            JOB_BUCKETS,
        )
        yield _histogram(
            "dicomnode_synthesis_seconds_per_view",
            "Engine time per synthesised view",
            per_view,
            VIEW_BUCKETS,
        )
        counter = CounterMetricFamily(
            "dicomnode_deliveries", "Deliveries of synthetic instances by peer and result", labels=["peer", "result"]
        )
        for peer, state, n in deliveries:
            if state != "pending":
                counter.add_metric([peer, state], n)
        yield counter
        free = GaugeMetricFamily("dicomnode_storage_free_bytes", "Free bytes on the store's file system")
        free.add_metric([], self.store.free_bytes())
        yield free
        identity = self.model_identity()
        info = GaugeMetricFamily("dicomnode_model_info", "The model in use (1), by identity", labels=["identity"])
        info.add_metric([identity or "unknown"], 1)
        yield info


def build_registry(
    sessions: sessionmaker[Session],
    store: InstanceStore,
    known_job_states: Sequence[str],
    model_identity: Callable[[], str | None],
) -> tuple[CollectorRegistry, ScpMetrics]:
    """A registry with the SCP counters and the database collector."""
    registry = CollectorRegistry()
    scp = ScpMetrics(registry)
    registry.register(DatabaseCollector(sessions, store, known_job_states, model_identity))
    return registry, scp
