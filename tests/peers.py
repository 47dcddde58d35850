"""Real processes for end-to-end tests: an Orthanc PACS and the node itself, on loopback.

Each starts on free ports in a temporary folder and is stopped by the test that started it.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.conftest import dcmtk, free_port

ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"  # Debian's orthanc-dicomweb


def wait_for(predicate: Any, timeout_s: float, what: str, interval_s: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")


class Orthanc:
    """A real Orthanc with its REST API; C-STORE success from it means stored and indexed.

    ``plugins``: paths of plugin libraries to load (e.g. :data:`DICOMWEB_PLUGIN`); ``modalities``:
    its ``DicomModalities``, name -> (AE title, host, port), the AEs it may send to (a Storage
    Commitment report goes to the requesting AE, which must be listed); ``extra``: further
    configuration keys (``LuaScripts``, ``RegisteredUsers``...), overriding the defaults.
    """

    def __init__(
        self,
        folder: Path,
        ae_title: str = "ORTHANC",
        *,
        plugins: tuple[str, ...] = (),
        modalities: dict[str, tuple[str, str, int]] | None = None,
        extra: dict[str, Any] | None = None,
    ):
        self.folder = folder
        self.ae_title = ae_title
        self.plugins = plugins
        self.modalities = modalities or {}
        self.extra = extra or {}
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Orthanc:
        self.folder.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "test-pacs",
            "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "index"),
            "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "Plugins": list(self.plugins),
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomAlwaysAllowStore": True,
            "DicomCheckCalledAet": True,
            "SyncStorageArea": True,
            "DicomModalities": {name: list(modality) for name, modality in self.modalities.items()},
            **self.extra,
        }
        config = {k: v for k, v in config.items() if v is not None}
        path = self.folder / "orthanc.json"
        path.write_text(json.dumps(config))
        log = open(self.folder / "orthanc.log", "wb")  # noqa: SIM115 - closed with the process
        env = {**os.environ, "TCP_NODELAY": "1"}
        self.proc = subprocess.Popen([ORTHANC, str(path)], stdout=log, stderr=subprocess.STDOUT, env=env)
        wait_for(self._ready, 30, "Orthanc to answer GET /system")
        return self

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(
                f"Orthanc exited with {self.proc.returncode}: {(self.folder / 'orthanc.log').read_text()}"
            )
        try:
            self.get("/system")
            return True
        except (urllib.error.URLError, ConnectionError):
            return False

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb (STOW-RS) base URL when the plugin is loaded."""
        return f"http://127.0.0.1:{self.http_port}/dicom-web"

    def get(self, path: str) -> Any:
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", headers=self._auth_headers())
        with urllib.request.urlopen(request, timeout=10) as r:
            body = r.read()
            return json.loads(body) if r.headers.get_content_type() == "application/json" else body

    def post(self, path: str, data: bytes) -> Any:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}{path}", data=data, method="POST", headers=self._auth_headers()
        )
        with urllib.request.urlopen(request, timeout=10) as r:
            return json.loads(r.read())

    def _auth_headers(self) -> dict[str, str]:
        """Basic auth as the first of ``RegisteredUsers`` when authentication is on."""
        users = self.extra.get("RegisteredUsers") if self.extra.get("AuthenticationEnabled") else None
        if not users:
            return {}
        user, password = next(iter(users.items()))
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def node_config(
    folder: Path,
    *,
    port: int,
    model: Path,
    pacs_port: int | None,
    settle_s: float = 0.3,
    rule_extra: str = "",
    azimuths: str = "[-90, -30, 30, 90]",
    http_port: int | None = None,
) -> Path:
    """A site configuration for a test node: SQLite in the folder, one rule, Orthanc as the peer.

    The console listens on ``http_port`` (a free port when None), never on the shared default.
    """
    peer = (
        f'[[peers]]\nname = "pacs"\nae_title = "ORTHANC"\nhost = "127.0.0.1"\nport = {pacs_port}\n' if pacs_port else ""
    )
    destinations = '["pacs"]' if pacs_port else "[]"
    text = f"""
[node]
ae_title = "SVDRR"
bind_address = "127.0.0.1"
port = {port}
storage_dir = "{folder / "var"}"
min_free_mb = 1

[engine]
model = "{model}"
steps = 2
guidance_scale = 3.0
max_batch = 8

[scheduler]
settle_s = {settle_s}
poll_interval_s = 0.2
backoff_initial_s = 0.5
backoff_max_s = 2
max_attempts = 3

[http]
port = {http_port if http_port is not None else free_port()}

{peer}
[[rules]]
name = "chest"
modalities = ["CR", "DX"]
azimuths = {azimuths}
destinations = {destinations}
{rule_extra}
"""
    path = folder / "dicomnode.toml"
    path.write_text(text)
    return path


class NodeProcess:
    """``dicomnode serve`` as a real subprocess in its own process group (workers included)."""

    def __init__(self, config: Path, port: int, log: Path):
        self.config = config
        self.port = port
        self.log_path = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 90) -> NodeProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dicomnode", "serve", "--config", str(self.config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        wait_for(self._answers_echo, timeout_s, "the node to answer C-ECHO", interval_s=0.5)
        return self

    def _answers_echo(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"node exited with {self.proc.returncode}:\n{self.log()}")
        result = subprocess.run(
            [dcmtk("echoscu"), "-aet", "TESTSCU", "-aec", "SVDRR", "127.0.0.1", str(self.port)],
            capture_output=True,
            timeout=20,
        )
        return result.returncode == 0

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout_s: float = 120) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)

    def kill_hard(self) -> None:
        """SIGKILL the node and its workers at once, as a power cut would."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.terminate(60)
            except subprocess.TimeoutExpired:
                self.kill_hard()
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # any worker left behind
            except ProcessLookupError:
                pass


def storescu(
    port: int, files: list[Path], called: str = "SVDRR", calling: str = "TESTSCU"
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [dcmtk("storescu"), "-aet", calling, "-aec", called, "127.0.0.1", str(port), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "TCP_NODELAY": "1"},
    )


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dicomnode", *args], capture_output=True, text=True, timeout=120)
