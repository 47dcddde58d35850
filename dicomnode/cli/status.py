"""``dicomnode status``: is the node answering, is there a model, what is queued and what failed,
and how long synthesis takes per view on each device that made the recent outputs.

Exits 4 (peer unreachable) when the node does not answer C-ECHO, so scripts and monitors can tell.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.cli.common import open_sessions, settings_from, when
from dicomnode.cli.config import add_config_argument
from dicomnode.cli.exitcodes import ExitCode
from dicomnode.config import PeerSettings, Settings

RECENT_OUTPUTS = 200  # per-view synthesis times are medians over at most this many newest outputs


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="node, model, queue and delivery status")
    add_config_argument(p)
    p.set_defaults(func=run)


def gate_summary(settings: Settings) -> str:
    """The consistency gate the worker applies: method, threshold and where it comes from."""
    from dicomnode.errors import ModelLoadError
    from dicomnode.gate import model_meta_for

    engine = settings.engine
    try:
        meta = model_meta_for(engine.model, engine.consistency_threshold)
    except ModelLoadError as e:
        return f"model metadata unusable: {e}"
    gate = meta.gate
    if gate.threshold is None:
        return f"{gate.method}: NOT calibrated, every input is refused (see README, consistency gate)"
    source = "[engine] consistency_threshold" if engine.consistency_threshold is not None else "the model"
    n = gate.calibration.get("n")
    calibrated = f", calibrated on {n} images" if n else ""
    return f"{gate.method} score must be >= {gate.threshold:g} (threshold from {source}{calibrated})"


def run(args: argparse.Namespace) -> int:
    from dicomnode.errors import DeliveryError
    from dicomnode.node import model_problem
    from dicomnode.scu import echo
    from storage.models import Delivery, Instance, Job

    settings = settings_from(args)
    node = settings.node
    self_peer = PeerSettings(name="self", ae_title=node.ae_title, host=node.bind_address, port=node.port)
    answering = True
    try:
        echo(self_peer, node.ae_title, timeout_s=5)
        listening = "answering C-ECHO"
    except DeliveryError as e:
        answering = False
        listening = f"NOT answering ({e})"
    print(f"node     {node.ae_title} at {node.bind_address}:{node.port}: {listening}")
    problem = model_problem(settings)
    print(f"model    {settings.engine.model}: {problem or 'present'}")
    if not problem:
        print(f"gate     {gate_summary(settings)}")
    sessions = open_sessions(settings)
    with sessions() as session:
        received = session.scalar(select(func.count()).select_from(Instance).where(Instance.origin == "received"))
        derived = session.scalar(select(func.count()).select_from(Instance).where(Instance.origin == "derived"))
        jobs = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
        deliveries = dict(session.execute(select(Delivery.state, func.count()).group_by(Delivery.state)).all())
        last_refused = session.scalars(
            select(Job).where(Job.state == "refused").order_by(Job.finished_at.desc(), Job.id.desc()).limit(1)
        ).first()
        if last_refused is not None:
            session.expunge(last_refused)
        speeds = synthesis_speeds(session)
    print(f"stored   {received} received, {derived} derived (synthetic) instances")
    print("jobs     " + (", ".join(f"{k} {v}" for k, v in sorted(jobs.items())) or "none"))
    print("delivery " + (", ".join(f"{k} {v}" for k, v in sorted(deliveries.items())) or "none"))
    if problem and jobs.get("waiting_model"):
        print(f"         {jobs['waiting_model']} job(s) wait for the model")
    if last_refused is not None:
        score = "" if last_refused.consistency_score is None else f" (score {last_refused.consistency_score:.2f})"
        reason = (last_refused.last_error or "").splitlines()[0][:160] if last_refused.last_error else ""
        print(f"gate     last refused: job {last_refused.id}{score}: {reason}")
    if not speeds:
        print("speed    no synthesised views yet")
    for i, (device, dtype, median_s, count) in enumerate(speeds):
        where = "current device" if i == 0 else "earlier"
        print(
            f"{'speed' if i == 0 else '':<8} {median_s:.3f} s per view on {device} {dtype} "
            f"({where}; median of the last {count} views)"
        )
    print_workers(sessions, settings)
    print_quarantine(settings)
    if settings.http.enabled:
        print(f"console  http{'s' if settings.http.tls else ''}://{settings.http.bind_address}:{settings.http.port}/")
    return ExitCode.OK if answering else ExitCode.PEER_UNREACHABLE


def synthesis_speeds(session: Any, limit: int = RECENT_OUTPUTS) -> list[tuple[str, str, float, int]]:
    """``(device, dtype, median seconds per view, views)`` over the newest outputs, newest device first.

    Each output row records its share of its job's synthesis time (``Output.synthesis_s``), so the
    median is the per-view time a job of that device actually saw, warm-up and batching included.
    """
    from storage.models import Output

    rows = session.execute(
        select(Output.device, Output.dtype, Output.synthesis_s)
        .where(Output.synthesis_s.is_not(None))
        .order_by(Output.id.desc())
        .limit(limit)
    ).all()
    groups: dict[tuple[str, str], list[float]] = {}
    for device, dtype, seconds in rows:  # newest first: dict order puts the current device first
        groups.setdefault((device or "unknown device", dtype or ""), []).append(float(seconds))
    return [(device, dtype, statistics.median(v), len(v)) for (device, dtype), v in groups.items()]


def print_workers(sessions: sessionmaker[Session], settings: Settings) -> None:
    """Every node and worker sharing the database, with the age of its last heartbeat."""
    from storage.heartbeats import list_workers
    from storage.models import utcnow

    now = utcnow()
    with sessions() as session:
        rows = list_workers(session)
    if not rows:
        print("workers  none seen")
        return
    print("workers  (heartbeat every scheduler.lease_s / 3; a lease runs out after lease_s)")
    for w in rows:
        age = (now - w.heartbeat_at).total_seconds()
        if w.stopped_at is not None:
            state = f"stopped {when(w.stopped_at)}"
        elif age > settings.scheduler.lease_s:
            state = f"SILENT for {age:.0f} s"
        else:
            state = f"alive, last heartbeat {age:.0f} s ago"
        job = f", job {w.job_id}" if w.job_id is not None and w.stopped_at is None else ""
        print(f"         {w.worker_id:<40} {w.role:<6} {w.host}:{w.pid}  {state}{job}")


def print_quarantine(settings: Settings) -> None:
    """Store files that had no database row at start-up (moved aside, never deleted)."""
    from storage.reconcile import quarantined_files
    from storage.store import InstanceStore

    files = quarantined_files(InstanceStore(settings.node.storage_dir, 0))
    if not files:
        print("quarantine none")
        return
    print(f"quarantine {len(files)} file(s) without a database row, under {settings.node.storage_dir}:")
    for path in files[:20]:
        print(f"         {path}")
    if len(files) > 20:
        print(f"         ... and {len(files) - 20} more")
