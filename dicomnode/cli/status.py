"""``dicomnode status``: is the node answering, is there a model, what is queued and what failed.

Exits 4 (peer unreachable) when the node does not answer C-ECHO, so scripts and monitors can tell.
"""

from __future__ import annotations

import argparse

from sqlalchemy import func, select

from dicomnode.cli.common import open_sessions, settings_from
from dicomnode.cli.config import add_config_argument
from dicomnode.cli.exitcodes import ExitCode
from dicomnode.config import PeerSettings


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="node, model, queue and delivery status")
    add_config_argument(p)
    p.set_defaults(func=run)


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
    sessions = open_sessions(settings)
    with sessions() as session:
        received = session.scalar(select(func.count()).select_from(Instance).where(Instance.origin == "received"))
        derived = session.scalar(select(func.count()).select_from(Instance).where(Instance.origin == "derived"))
        jobs = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
        deliveries = dict(session.execute(select(Delivery.state, func.count()).group_by(Delivery.state)).all())
    print(f"stored   {received} received, {derived} derived (synthetic) instances")
    print("jobs     " + (", ".join(f"{k} {v}" for k, v in sorted(jobs.items())) or "none"))
    print("delivery " + (", ".join(f"{k} {v}" for k, v in sorted(deliveries.items())) or "none"))
    if problem and jobs.get("waiting_model"):
        print(f"         {jobs['waiting_model']} job(s) wait for the model")
    if settings.http.enabled:
        print(f"console  http{'s' if settings.http.tls else ''}://{settings.http.bind_address}:{settings.http.port}/")
    return ExitCode.OK if answering else ExitCode.PEER_UNREACHABLE
