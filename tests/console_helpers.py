"""Helpers for the console tests: an in-process node edge (SCP + console, no workers) and HTTP calls."""

from __future__ import annotations

import http.cookiejar
import json
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from dicomnode.config import Settings, load_settings
from dicomnode.console.metrics import build_registry
from dicomnode.console.server import ConsoleServer
from dicomnode.console.state import ConsoleContext
from dicomnode.intake import Intake
from dicomnode.node import model_problem
from dicomnode.scp import StorageSCP
from storage.db import make_engine, session_factory, upgrade
from storage.models import JOB_STATES
from storage.store import InstanceStore
from tests.conftest import free_port

SAMPLE = Path(__file__).resolve().parent.parent / "models" / "demo" / "sample" / "chest_pa_drr_phantom.dcm"


def console_settings(
    folder: Path, *, http: str = "", security: str = "", min_free_mb: int = 0, model: Path | None = None
) -> Settings:
    config = folder / "dicomnode.toml"
    config.write_text(
        f"""
[node]
ae_title = "SVDRR"
port = {free_port()}
storage_dir = "{folder / "var"}"
min_free_mb = {min_free_mb}

[security]
{security}

[engine]
model = "{model or folder / "no-model"}"

[scheduler]
settle_s = 600

[http]
port = {free_port()}
{http}

[[peers]]
name = "pacs"
ae_title = "ORTHANC"
host = "127.0.0.1"
port = {free_port()}

[[rules]]
name = "chest"
modalities = ["CR", "DX"]
body_parts = ["CHEST", ""]
azimuths = [-30, 30]
destinations = ["pacs"]

[[rules]]
name = "knee-ct"
modalities = ["CT"]
body_parts = ["KNEE"]
azimuths = [90]
"""
    )
    return load_settings(config, env={})


@dataclass
class Edge:
    settings: Settings
    store: InstanceStore
    ctx: ConsoleContext
    scp: StorageSCP
    console: ConsoleServer

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.console.port}"


@contextmanager
def running_edge(settings: Settings) -> Iterator[Edge]:
    """The SCP (with intake) and the console over one SQLite file, as ``dicomnode serve`` runs them."""
    settings.node.storage_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.node.effective_database_url)
    upgrade(engine)
    sessions = session_factory(engine)
    store = InstanceStore(settings.node.storage_dir, settings.node.min_free_mb * 2**20)
    scp = StorageSCP(settings, store, sessions, Intake(settings))
    scp.start()
    ctx = ConsoleContext(
        settings=settings,
        sessions=sessions,
        store=store,
        scp_listening=lambda: scp.listening,
        model_problem=lambda: model_problem(settings),
    )
    ctx.registry, scp_metrics = build_registry(sessions, store, JOB_STATES, ctx.model_identity)
    scp_metrics.bind(scp)
    console = ConsoleServer(ctx).start()
    try:
        yield Edge(settings, store, ctx, scp, console)
    finally:
        console.stop()
        scp.stop(timeout_s=5)
        engine.dispose()


class Client:
    """urllib with a cookie jar; answers (status, headers, body) and never raises on HTTP errors."""

    def __init__(self, base: str, token: str | None = None) -> None:
        self.base = base
        self.token = token
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar), _NoRedirect())

    def request(
        self, method: str, path: str, data: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, Any, bytes]:
        headers = dict(headers or {})
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        try:
            with self.opener.open(req, timeout=30) as r:
                return r.status, r.headers, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.headers, e.read()

    def get(self, path: str) -> tuple[int, Any, bytes]:
        return self.request("GET", path)

    def json(self, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        status, _, body = self.request(method, path, **kw)
        return status, json.loads(body)

    def post_form(self, path: str, fields: dict[str, str]) -> tuple[int, Any, bytes]:
        body = urllib.parse.urlencode(fields).encode()
        return self.request("POST", path, body, {"Content-Type": "application/x-www-form-urlencoded"})

    def csrf_from(self, path: str) -> str:
        _, _, body = self.get(path)
        match = re.search(rb'name="csrf_token" value="([^"]+)"', body)
        assert match, f"no CSRF token in {path}"
        return match.group(1).decode()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def scrape(base: str, token: str | None = None) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``/metrics`` parsed by prometheus_client's own parser: {(sample name, sorted labels): value}."""
    status, _, body = Client(base, token).get("/metrics")
    assert status == 200, body
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def dataset_bytes(path: Path) -> int:
    """Bytes of the data set in a Part 10 file, what its C-STORE carries (PS3.10 7.1: preamble 128,
    prefix 4, then the File Meta group: its Group Length element (12 bytes) and the length it gives)."""
    import pydicom

    meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
    return path.stat().st_size - (128 + 4 + 12 + int(meta.FileMetaInformationGroupLength))
