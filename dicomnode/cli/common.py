"""What several commands share: loading the settings and opening the database."""

from __future__ import annotations

import argparse
import re
from datetime import datetime

from sqlalchemy.orm import Session, sessionmaker

from dicomnode.config import Settings, load_settings
from dicomnode.errors import StorageError
from synthesis.model_meta import ModelMeta

_NUMBER = r"-?(\d+\.?\d*|\.\d+)"
_ANGLE_LIST = re.compile(rf"^-(\d+\.?\d*|\.\d+)(,{_NUMBER})*$")


def degrees(text: str) -> list[float]:
    """An argparse type: comma-separated degrees, e.g. ``-90,-45,0,45,90``."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"angles must be comma-separated numbers, got {text!r}") from e
    if not values:
        raise argparse.ArgumentTypeError(f"no angles in {text!r}")
    return values


def accept_negative_lists(parser: argparse.ArgumentParser) -> None:
    """Let "--azimuths -90,-45,0" work as written.

    argparse takes a value starting with "-" for an option unless it looks like one negative
    number; widen that test to comma-separated lists of numbers.
    """
    parser._negative_number_matcher = _ANGLE_LIST  # type: ignore[attr-defined]


def settings_from(args: argparse.Namespace, **overrides: object) -> Settings:
    """Settings from --config (file, then environment, then these CLI overrides)."""
    return load_settings(getattr(args, "config", None), overrides={k: v for k, v in overrides.items() if v is not None})


def open_sessions(settings: Settings, migrate: bool = False) -> sessionmaker[Session]:
    """Sessions on the node's database: migrated to head with ``migrate``, otherwise only checked.

    A reading command never creates the database: without ``migrate`` a SQLite file that does not
    exist yet is an error, not a new empty file (the node creates and migrates it when it starts).
    """
    from storage.db import check_schema, make_engine, missing_sqlite_file, session_factory, upgrade

    missing = None if migrate else missing_sqlite_file(settings.node.effective_database_url)
    if missing is not None:
        raise StorageError(
            f"no database at {missing} yet: the node creates it when it first starts (`dicomnode serve`), "
            "or run `dicomnode db upgrade`"
        )
    engine = make_engine(settings.node.effective_database_url)
    if migrate:
        upgrade(engine)
    else:
        check_schema(engine)
    return session_factory(engine)


def when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def sampler_origin(given: object, meta: ModelMeta) -> str:
    """Where a sampler value a command prints comes from: the command line, or the model."""
    if given is not None:
        return "given"
    return f"recommended by {meta.source}" if meta.source else "SV-DRR default: the model has no dicomnode-model.json"
