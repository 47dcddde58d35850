"""``dicomnode recall``: withdraw derived outputs with an IHE IOCM rejection note.

Choose the outputs with exactly one of ``--model IDENTITY``, ``--job ID`` or ``--series UID``.
Per study, a Key Object Selection Document titled "Rejected for Quality Reasons" (113001, DCM) or
"Rejected for Patient Safety Reasons" (113037, DCM) is stored, recorded and queued to every peer
that acknowledged (or was tried with) one of the outputs; the outputs are marked recalled and never sent again.
``--dry-run`` prints the plan and changes nothing.
"""

from __future__ import annotations

import argparse
import getpass
from typing import TYPE_CHECKING

from dicomnode.cli.common import open_sessions, settings_from
from dicomnode.cli.config import add_config_argument
from dicomnode.cli.exitcodes import ExitCode

if TYPE_CHECKING:
    from dicomnode.recall import RecallSelector


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "recall",
        help="withdraw derived outputs (by model, job or series) with a rejection note sent to every peer",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_config_argument(p)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", metavar="IDENTITY", help="every output of these weights (digest, or >= 12 hex)")
    which.add_argument("--job", metavar="ID", help="every output of this job")
    which.add_argument("--series", metavar="UID", help="every output in this derived Series Instance UID")
    p.add_argument("--reason", choices=["quality", "safety"], default="quality", help="Document Title of the note")
    p.add_argument("--by", default=None, help="who asks for the recall (default: the login name)")
    p.add_argument("--dry-run", action="store_true", help="print what would happen; change nothing")
    p.set_defaults(func=run)


def _selector(args: argparse.Namespace) -> RecallSelector:
    from dicomnode.recall import RecallSelector

    if args.model is not None:
        return RecallSelector("model", args.model)
    if args.job is not None:
        return RecallSelector("job", args.job)
    return RecallSelector("series", args.series)


def run(args: argparse.Namespace) -> int:
    from dicomnode.errors import RecallError
    from dicomnode.recall import execute_recall, plan_recall
    from storage.store import InstanceStore

    settings = settings_from(args)
    sessions = open_sessions(settings)
    try:
        selector = _selector(args)
        with sessions() as session:
            plan = plan_recall(session, selector, args.reason)
    except RecallError as e:
        print(f"nothing recalled: {e}")
        return ExitCode.NOT_FOUND
    if plan.already_recalled:
        print(f"{len(plan.already_recalled)} matching output(s) already recalled: left as they are")
    if not plan.studies:
        print(f"every output matching {selector} is already recalled; nothing to do")
        return ExitCode.OK
    verb = "would recall" if args.dry_run else "recalling"
    for study in plan.studies:
        peers = ", ".join(t.peer_name for t in study.targets) or "no peer (none acknowledged these outputs)"
        print(f"{verb} {len(study.output_ids)} output(s) of study {study.study_instance_uid} ({args.reason})")
        for uid in study.sop_instance_uids:
            print(f"  {uid}")
        print(f"  rejection note to: {peers}")
    if args.dry_run:
        print("dry run: nothing changed")
        return ExitCode.OK
    out = settings.output
    store = InstanceStore(settings.node.storage_dir, settings.node.min_free_mb * 2**20)
    done = execute_recall(
        sessions,
        store,
        plan,
        requested_by=args.by or getpass.getuser(),
        manufacturer=out.manufacturer,
        series_number=out.recall_series_number,
    )
    for item in done:
        print(
            f"recall {item.recall_id}: rejection note {item.note_sop_instance_uid} for {item.n_outputs} output(s) "
            f"queued to {', '.join(item.peers) or 'no peer'}"
        )
    return ExitCode.OK
