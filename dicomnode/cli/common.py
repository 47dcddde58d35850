"""What several commands share: loading the settings and opening the database."""

from __future__ import annotations

import argparse
from datetime import datetime

from sqlalchemy.orm import Session, sessionmaker

from dicomnode.config import Settings, load_settings


def settings_from(args: argparse.Namespace, **overrides: object) -> Settings:
    """Settings from --config (file, then environment, then these CLI overrides)."""
    return load_settings(getattr(args, "config", None), overrides={k: v for k, v in overrides.items() if v is not None})


def open_sessions(settings: Settings, migrate: bool = False) -> sessionmaker[Session]:
    from storage.db import check_schema, make_engine, session_factory, upgrade

    engine = make_engine(settings.node.effective_database_url)
    if migrate:
        upgrade(engine)
    else:
        check_schema(engine)
    return session_factory(engine)


def when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else "-"
