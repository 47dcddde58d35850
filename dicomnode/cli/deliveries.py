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
    p.add_argument("--resend-failed", action="store_true", help="send every failed delivery (of --peer) again")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dicomnode.errors import StorageError
    from storage.deliveries import list_deliveries, resend, resend_failed
    from storage.models import Instance

    sessions = open_sessions(settings_from(args))
    if args.resend_failed:
        with sessions.begin() as session:
            ids = resend_failed(session, peer_name=args.peer)
        where = f" to {args.peer}" if args.peer else ""
        print(f"{len(ids)} failed deliveries{where} queued again" + (f": {', '.join(map(str, ids))}" if ids else ""))
        return ExitCode.OK
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
