"""``dicomnode send``: C-STORE files (or whole folders) to a peer over one association.

Useful to feed the node by hand (``--to`` a peer that is the node itself) or to push a derived series
to a PACS again. Files are sent as they are, in their own transfer syntax when the peer accepts it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dicomnode.cli.common import settings_from
from dicomnode.cli.config import add_config_argument
from dicomnode.cli.echo import add_peer_arguments, peer_from
from dicomnode.cli.exitcodes import ExitCode

# Files in a DICOM folder that are not instances (PS3.10 9.2: the DICOMDIR media directory).
_NOT_INSTANCES = frozenset({"DICOMDIR"})


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "send",
        help="C-STORE DICOM files or folders to a peer",
        description="Send DICOM files (folders are searched recursively) to a peer over one association "
        "and print one line per instance with the peer's status.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("files", nargs="+", type=Path, metavar="FILE", help="DICOM files or folders")
    add_config_argument(p)
    add_peer_arguments(p, name_flag="--to")
    p.set_defaults(timeout=60.0)
    p.set_defaults(func=run)


def collect_files(paths: list[Path]) -> list[Path]:
    """The files named, and every file under the folders named (sorted, hidden files skipped)."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and not p.name.startswith(".") and p.name not in _NOT_INSTANCES
            )
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(path)
    return found


def run(args: argparse.Namespace) -> int:
    from dicomnode.errors import DeliveryError
    from dicomnode.scu import send

    settings = settings_from(args)
    peer = peer_from(args, settings)
    if isinstance(peer, ExitCode):
        return peer
    try:
        files = collect_files(args.files)
    except FileNotFoundError as e:
        print(f"dicomnode: no such file or folder: {e.args[0]}", file=sys.stderr)
        return ExitCode.NOT_FOUND
    if not files:
        print("dicomnode: no files to send", file=sys.stderr)
        return ExitCode.NOT_FOUND
    calling_ae = args.ae_title or settings.node.ae_title
    try:
        results = send(peer, calling_ae, files, args.timeout, security=settings.security)
    except DeliveryError as e:
        print(f"dicomnode: {e}", file=sys.stderr)
        return ExitCode.PEER_UNREACHABLE
    for path, result in zip(files, results, strict=True):
        status = f"0x{result.status:04X}" if result.status is not None else "not sent"
        detail = f" {result.error}" if result.error else ""
        print(f"{path}: {result.sop_instance_uid or '-'} {status}{detail}")
    failed = sum(not r.succeeded for r in results)
    if failed:
        print(f"{failed} of {len(results)} instances failed", file=sys.stderr)
        return ExitCode.FAILURE
    return ExitCode.OK
