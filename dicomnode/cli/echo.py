"""``dicomnode echo``: C-ECHO a peer from the configuration, or any node given on the command line.

The first thing to run when a PACS says it cannot reach us, or we cannot reach it: it opens an
association exactly as deliveries do (our AE title, the peer's, TLS when the peer says so).
"""

from __future__ import annotations

import argparse
import sys

from dicomnode.cli.common import settings_from
from dicomnode.cli.config import add_config_argument
from dicomnode.cli.exitcodes import ExitCode
from dicomnode.config import PeerSettings, Settings


def add_peer_arguments(parser: argparse.ArgumentParser, name_flag: str | None = None) -> None:
    """Arguments naming the peer: its name in the configuration, or ``--host/--port/--called-ae``.

    With ``name_flag`` (e.g. ``"--to"``) the name is that option, otherwise a positional ``PEER``.
    """
    help_name = "peer name from the configuration's [[peers]]; or give --host, --port and --called-ae"
    if name_flag:
        parser.add_argument(name_flag, dest="peer", metavar="PEER", help=help_name)
    else:
        parser.add_argument("peer", nargs="?", metavar="PEER", help=help_name)
    parser.add_argument("--host", help="host name or address of an ad-hoc peer")
    parser.add_argument("--port", type=int, help="TCP port of an ad-hoc peer")
    parser.add_argument("--called-ae", metavar="AE", help="AE title of an ad-hoc peer")
    parser.add_argument("--tls", action="store_true", help="connect to the ad-hoc peer with TLS")
    parser.add_argument("-aet", "--ae-title", metavar="AE", help="our calling AE title (default: node.ae_title)")
    parser.add_argument("--timeout", type=float, default=30.0, metavar="S", help="seconds to wait for the peer")


def resolve_peer(args: argparse.Namespace, settings: Settings) -> PeerSettings:
    """The peer the arguments name.

    Raises LookupError for an unknown peer name, ValueError for a missing or doubled choice, and
    ConfigError for an invalid ad-hoc peer (bad AE title, port out of range).
    """
    adhoc = (args.host, args.port, args.called_ae)
    if args.peer and any(v is not None for v in adhoc):
        raise ValueError("give a peer name or --host/--port/--called-ae, not both")
    if args.peer:
        try:
            peer = settings.peer(args.peer)
        except KeyError as e:
            raise LookupError(e.args[0]) from e
        if peer.kind != "dimse":
            raise ValueError(f"peer {peer.name} is a {peer.kind} peer; this command speaks DIMSE")
        return peer
    if any(v is None for v in adhoc):
        raise ValueError("name a configured peer, or give all of --host, --port and --called-ae")
    return PeerSettings(name="adhoc", ae_title=args.called_ae, host=args.host, port=args.port, tls=args.tls)


def peer_from(args: argparse.Namespace, settings: Settings) -> PeerSettings | ExitCode:
    """:func:`resolve_peer`, with its refusals printed and turned into exit codes."""
    try:
        return resolve_peer(args, settings)
    except LookupError as e:
        print(f"dicomnode: {e.args[0]}", file=sys.stderr)
        return ExitCode.NOT_FOUND
    except ValueError as e:
        print(f"dicomnode: {e}", file=sys.stderr)
        return ExitCode.USAGE


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "echo",
        help="C-ECHO a peer (verify that it answers)",
        description="Open an association to a peer and send a C-ECHO (PS3.7 9.1.5); print its status.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_config_argument(p)
    add_peer_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dicomnode.errors import DeliveryError
    from dicomnode.scu import echo

    settings = settings_from(args)
    peer = peer_from(args, settings)
    if isinstance(peer, ExitCode):
        return peer
    calling_ae = args.ae_title or settings.node.ae_title
    where = f"{peer.ae_title}@{peer.host}:{peer.port}"
    try:
        status = echo(peer, calling_ae, args.timeout, security=settings.security)
    except DeliveryError as e:
        print(f"{peer.name} ({where}): no answer: {e}", file=sys.stderr)
        return ExitCode.PEER_UNREACHABLE
    print(f"{peer.name} ({where}): C-ECHO status 0x{status:04X}")
    return ExitCode.OK if status == 0 else ExitCode.FAILURE
