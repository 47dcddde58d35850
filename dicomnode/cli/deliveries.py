"""``dicomnode deliveries``: list deliveries to peers, resend one."""

from __future__ import annotations

import argparse

from dicomnode.cli.common import open_sessions, settings_from, when
from dicomnode.cli.config import add_config_argument
from dicomnode.cli.exitcodes import ExitCode


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("deliveries", help="list deliveries; --resend ID sends one again")
    add_config_argument(p)
    p.add_argument("--state", choices=["pending", "sent", "committing", "committed", "failed", "cancelled"])
    p.add_argument("--peer", help="only this peer name")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--resend", type=int, metavar="ID", help="send delivery ID again")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dicomnode.errors import StorageError
    from storage.deliveries import list_deliveries, resend
    from storage.models import Instance

    sessions = open_sessions(settings_from(args))
    if args.resend is not None:
        try:
            with sessions.begin() as session:
                resend(session, args.resend)
        except (StorageError, LookupError) as e:
            print(f"cannot resend delivery {args.resend}: {e}")
            return ExitCode.NOT_FOUND
        print(f"delivery {args.resend} queued again")
        return ExitCode.OK
    with sessions() as session:
        rows = list_deliveries(session, state=args.state, peer_name=args.peer, limit=args.limit)
        print(f"{'id':>5} {'state':<10} {'peer':<12} {'status':<7} {'tries':>5} {'sent':<19} instance / error")
        for d in rows:
            uid = session.get_one(Instance, d.output_instance_id).sop_instance_uid
            status = f"0x{d.status_code:04X}" if d.status_code is not None else "-"
            tail = uid + (f"  ({d.last_error.splitlines()[0][:60]})" if d.last_error else "")
            sent = when(d.sent_at)
            print(f"{d.id:>5} {d.state:<10} {d.peer_name[:12]:<12} {status:<7} {d.attempts:>5} {sent:<19} {tail}")
    return ExitCode.OK
