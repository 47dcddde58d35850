"""The one command line, ``dicomnode``, with a subcommand per job.

Each command module exposes ``register(subparsers)``, which adds its parser and sets
``func`` to a callable taking the parsed arguments and returning an exit code.
``main(argv)`` is callable from tests; only it configures logging handlers.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from dicomnode import __version__
from dicomnode.cli.exitcodes import ExitCode
from dicomnode.errors import ConfigError, NodeError
from dicomnode.log_config import quiet_libraries
from dicomnode.log_escape import SingleLineMessages

logger = logging.getLogger(__name__)

# Modules under dicomnode.cli, in the order their commands appear in --help.
COMMAND_MODULES: tuple[str, ...] = (
    "serve",
    "status",
    "echo",
    "send",
    "jobs",
    "deliveries",
    "provenance",
    "recall",
    "synthesize",
    "drr",
    "train",
    "evaluate",
    "config",
    "db",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dicomnode",
        description="DICOM view-synthesis node (SV-DRR). Output images are synthetic, not acquired.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"dicomnode.cli.{name}").register(sub)
    return parser


def configure_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_libraries(show=verbosity >= 2)
    for handler in logging.getLogger().handlers:
        handler.addFilter(SingleLineMessages())  # no peer-sent value can forge a log line


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return ExitCode.USAGE
    configure_logging(args.verbose)
    try:
        return int(args.func(args))
    except ConfigError as e:
        print(f"dicomnode: configuration error: {e}", file=sys.stderr)
        return ExitCode.CONFIG
    except NodeError as e:
        print(f"dicomnode: {e}", file=sys.stderr)
        return ExitCode.FAILURE
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
