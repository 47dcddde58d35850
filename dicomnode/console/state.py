"""What the console knows about the node it runs in, and the two summaries built from it.

:class:`ConsoleContext` is handed to every route: settings, database sessions, the store and a
few callables into the running node (is the SCP listening, what the model lacks). Built by
:class:`dicomnode.console.server.ConsoleServer` from a :class:`dicomnode.node.Node`, or by tests.
"""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.config import Settings, mask_database_url
from dicomnode.console import queries
from storage.models import Delivery, Job, utcnow
from storage.store import InstanceStore

SECRET_KEYS = ("api_token", "password_hash", "tls_private_key")


@dataclass
class ConsoleContext:
    settings: Settings
    sessions: sessionmaker[Session]
    store: InstanceStore
    scp_listening: Callable[[], bool]
    model_problem: Callable[[], str | None]
    registry: CollectorRegistry | None = None
    started_at: datetime = field(default_factory=utcnow)
    hostname: str = field(default_factory=socket.gethostname)

    @property
    def thumbnail_dir(self) -> Path:
        from dicomnode.console.thumbnails import cache_dir

        return cache_dir(self.settings.node.storage_dir)

    def model_identity(self) -> str | None:
        with self.sessions() as session:
            return queries.latest_model_identity(session)


def overview(ctx: ConsoleContext) -> dict[str, Any]:
    """Node, workers, model, queue depth, last 24 h, storage and recent errors."""
    s = ctx.settings
    with ctx.sessions() as session:
        workers = queries.workers(session, s.scheduler.lease_s)
        jobs = queries.counts_by_state(session, Job.state)
        deliveries = queries.counts_by_state(session, Delivery.state)
        day = queries.last_24h(session)
        errors = queries.recent_errors(session)
        identity = queries.latest_model_identity(session)
    free = ctx.store.free_bytes()
    watermark = s.node.min_free_mb * 2**20
    card = queries.model_card(s.engine.model)
    return {
        "node": {
            "ae_title": s.node.ae_title,
            "host": ctx.hostname,
            "dicom": f"{s.node.bind_address}:{s.node.port}",
            "up": ctx.scp_listening(),
            "started_at": ctx.started_at,
        },
        "workers": workers,
        "model": {
            "folder": str(s.engine.model),
            "problem": ctx.model_problem(),
            "identity": identity,
            "card": card,
        },
        "jobs": jobs,
        "deliveries": deliveries,
        "last_24h": day,
        "storage": {"free_bytes": free, "watermark_bytes": watermark, "above_watermark": free >= watermark},
        "errors": errors,
    }


def _redacted(key: str, value: Any) -> Any:
    if key in SECRET_KEYS and value:
        return "***"
    if key == "database_url" and value:
        return mask_database_url(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def effective_config(settings: Settings) -> dict[str, Any]:
    """The settings in force, section by section, with secrets replaced by ``***``."""
    config: dict[str, Any] = {"source": str(settings.source) if settings.source else None}
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if dataclasses.is_dataclass(value):
            config[f.name] = {k.name: _redacted(k.name, getattr(value, k.name)) for k in dataclasses.fields(value)}
        elif isinstance(value, tuple):
            config[f.name] = [
                {k.name: _redacted(k.name, getattr(item, k.name)) for k in dataclasses.fields(item)} for item in value
            ]
    config["node"]["effective_database_url"] = mask_database_url(settings.node.effective_database_url)
    return config
