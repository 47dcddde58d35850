"""Engines, sessions and schema migrations for the provenance database.

SQLite (a file, the default) and PostgreSQL (by URL) are both first-class. On SQLite every
connection gets write-ahead logging (readers do not block the writer), enforced foreign keys and
a busy timeout (a second writer waits instead of failing). pysqlite's own transaction handling is
kept: it opens a transaction at the first write statement, so a session reads committed data
until it writes, like PostgreSQL's default READ COMMITTED, and the write statement itself waits
for the database lock (no stale-snapshot "database is locked" errors between two workers).

The schema is managed only by the Alembic migrations shipped in ``storage/migrations``;
``upgrade`` runs them programmatically (``dicomnode db upgrade`` calls it).
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import create_engine, event
from sqlalchemy.engine import URL, CursorResult, Engine, Result, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.errors import ConfigError, StorageError

logger = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 30_000
SQLITE_SYNCHRONOUS = ("FULL", "NORMAL")


def _parse_url(database_url: str) -> URL:
    try:
        return make_url(database_url)
    except ArgumentError as e:
        raise ConfigError(f"database URL {database_url!r} is not a valid SQLAlchemy URL") from e


def sqlite_file(url: URL) -> Path | None:
    """The database file of a SQLite URL, or None for an in-memory database."""
    database = url.database or ""
    if database in ("", ":memory:") or database.startswith("file:"):
        return None
    return Path(database).expanduser()


def missing_sqlite_file(database_url: str) -> Path | None:
    """The file of a SQLite database URL when that file does not exist yet, else None."""
    url = _parse_url(database_url)
    if url.get_backend_name() != "sqlite":
        return None
    path = sqlite_file(url)
    return path if path is not None and not path.exists() else None


def _sqlite_configurer(synchronous: str) -> Callable[[Any, Any], None]:
    def configure(dbapi_connection: Any, connection_record: Any) -> None:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA foreign_keys = ON")
            cursor.execute(f"PRAGMA synchronous = {synchronous}")
        finally:
            cursor.close()

    return configure


def with_installed_driver(url: URL) -> URL:
    """A ``postgresql://`` URL (no driver named) with a PostgreSQL driver that is installed.

    SQLAlchemy 2.1 maps a bare ``postgresql://`` to psycopg 3; the project installs psycopg2
    (``psycopg2-binary``). So the URL a user writes, as README documents it, keeps working: psycopg 3
    when it is installed, psycopg2 otherwise. A URL that names its driver is left as written.
    """
    if url.drivername != "postgresql":
        return url
    for module, drivername in (("psycopg", "postgresql+psycopg"), ("psycopg2", "postgresql+psycopg2")):
        if importlib.util.find_spec(module) is not None:
            return url.set(drivername=drivername)
    return url  # neither: create_engine names the missing module


def make_engine(database_url: str, synchronous: str = "FULL") -> Engine:
    """An engine for ``database_url`` (``sqlite:///path`` or ``postgresql://...``).

    For SQLite the parent folder of the file is created. ``synchronous = FULL`` makes each commit
    durable on power loss in WAL mode. ``"NORMAL"`` (SQLite only) writes the WAL without syncing it:
    a commit is durable only after a flush of the filesystem, which the Storage SCP makes once for a
    group of commits before it acknowledges them (:mod:`storage.durability`); every other writer
    keeps ``FULL``.
    """
    if synchronous not in SQLITE_SYNCHRONOUS:
        raise ValueError(f"synchronous must be one of {', '.join(SQLITE_SYNCHRONOUS)}, got {synchronous!r}")
    url = with_installed_driver(_parse_url(database_url))
    try:
        if url.get_backend_name() == "sqlite":
            path = sqlite_file(url)
            if path is not None:
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                except OSError as e:
                    raise StorageError(f"cannot create the database folder {path.parent}: {e}") from e
            engine = create_engine(url)
            event.listen(engine, "connect", _sqlite_configurer(synchronous))
        else:
            engine = create_engine(url, pool_pre_ping=True)
    except (ArgumentError, NoSuchModuleError) as e:
        raise ConfigError(f"database URL {url.render_as_string(hide_password=True)!r}: {e}") from e
    logger.debug("database engine for %s", url.render_as_string(hide_password=True))
    return engine


def affected_rows(result: Result[Any]) -> int:
    """Rows an UPDATE or INSERT changed: what conditional updates check to know they won."""
    return int(cast(CursorResult[Any], result).rowcount)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions bound to ``engine``; objects stay readable after commit (no expiry on commit)."""
    return sessionmaker(engine, expire_on_commit=False)


def alembic_config() -> Config:
    """An Alembic configuration pointing at the migrations shipped inside the package."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def head_revision() -> str:
    """The newest migration revision this code ships."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise StorageError(f"no migration revisions found under {MIGRATIONS_DIR}")
    return head


def upgrade(target: Engine | str, revision: str = "head") -> None:
    """Migrate the database at ``target`` (an engine or a URL) to ``revision`` (default: head).

    Safe to run on every start: an up-to-date database is left as it is.
    """
    engine = make_engine(target) if isinstance(target, str) else target
    config = alembic_config()
    try:
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, revision)
    except (SQLAlchemyError, CommandError) as e:
        raise StorageError(f"database migration to {revision!r} failed: {e}") from e
    finally:
        if isinstance(target, str):
            engine.dispose()
    logger.info("database schema at revision %s", revision)


def current_revision(engine: Engine) -> str | None:
    """The migration revision the database is at, or None for a database never migrated."""
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    except SQLAlchemyError as e:
        raise StorageError(f"cannot read the schema revision: {e}") from e


def check_schema(engine: Engine) -> None:
    """Refuse to run against a database whose schema is not the one this code expects."""
    current, head = current_revision(engine), head_revision()
    if current != head:
        raise StorageError(
            f"database schema is at revision {current!r}, this version needs {head!r}: run `dicomnode db upgrade`"
        )
