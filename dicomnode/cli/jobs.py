"""``dicomnode jobs``: list synthesis jobs, retry failed ones."""

from __future__ import annotations

import argparse

from dicomnode.cli.common import open_sessions, settings_from, when
from dicomnode.cli.config import add_config_argument
from dicomnode.cli.exitcodes import ExitCode


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("jobs", help="list jobs; --retry ID queues a failed job again")
    add_config_argument(p)
    p.add_argument("--state", choices=["queued", "running", "done", "failed", "waiting_model", "refused"])
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--retry", type=int, metavar="ID", help="queue failed job ID again (a refused job is never retried)")
    p.set_defaults(func=run)


def gate_score(job: object) -> str:
    """The consistency score as a short cell ("22.34", "-" when none was computed)."""
    score = getattr(job, "consistency_score", None)
    return "-" if score is None else f"{score:.2f}"


def run(args: argparse.Namespace) -> int:
    from dicomnode.errors import StorageError
    from storage.jobs import list_jobs, retry_job

    sessions = open_sessions(settings_from(args))
    if args.retry is not None:
        try:
            with sessions.begin() as session:
                retry_job(session, args.retry)
        except (StorageError, LookupError) as e:
            print(f"cannot retry job {args.retry}: {e}")
            return ExitCode.NOT_FOUND
        print(f"job {args.retry} queued again")
        return ExitCode.OK
    with sessions() as session:
        jobs = list_jobs(session, state=args.state, limit=args.limit)
        print(f"{'id':>5} {'state':<13} {'tries':>5} {'rule':<20} {'views':<28} {'created':<19} {'gate':>8} error")
        for j in jobs:
            views = ",".join(f"{a:g}" for a in j.azimuths)
            width = 160 if j.state == "refused" else 60  # a refusal's reason is the point of the line
            error = (j.last_error or "").splitlines()[0][:width] if j.last_error else ""
            print(
                f"{j.id:>5} {j.state:<13} {j.attempts:>2}/{j.max_attempts:<2} {j.rule_name[:20]:<20} "
                f"{views[:28]:<28} {when(j.created_at):<19} {gate_score(j):>8} {error}"
            )
    return ExitCode.OK
