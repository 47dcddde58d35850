"""``dicomnode db upgrade | current``: schema migrations (Alembic) of the node's database."""

from __future__ import annotations

import argparse

from dicomnode.cli.common import settings_from
from dicomnode.cli.config import add_config_argument
from dicomnode.cli.exitcodes import ExitCode


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("db", help="database schema: upgrade to the current version, or show it")
    add_config_argument(p)
    p.add_argument("action", choices=["upgrade", "current"])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dicomnode.config import mask_database_url
    from storage.db import current_revision, head_revision, make_engine, upgrade

    settings = settings_from(args)
    url = settings.node.effective_database_url
    if url.startswith("sqlite"):
        settings.node.storage_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(url)
    if args.action == "upgrade":
        upgrade(engine)
    print(f"{mask_database_url(url)}: revision {current_revision(engine) or 'none'} (head {head_revision()})")
    return ExitCode.OK
