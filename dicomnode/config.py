"""Site configuration: one typed, immutable :class:`Settings` object, loaded once and passed in.

Where values come from, later sources winning (style practice 5):

1. the built-in defaults of the dataclasses below (also documented in ``config/dicomnode.toml``);
2. the TOML file: ``--config PATH``, else ``$DICOMNODE_CONFIG``, else ``config/dicomnode.toml`` in
   the current directory. Relative paths in the file (``node.storage_dir``, ``engine.model``, the
   ``security.tls_*`` files) resolve against the folder holding the file, so a site folder can be
   moved as a whole;
3. the environment: ``DICOMNODE_<SECTION>__<KEY>`` (``DICOMNODE_NODE__PORT=11113``), parsed as a TOML
   value when it parses (numbers, booleans, arrays) and taken as a plain string otherwise. String
   settings always take the raw text. ``[[peers]]`` and ``[[rules]]`` cannot be set this way;
4. command-line flags, passed as ``overrides`` keyed ``"section.key"`` (``None`` means not given).

Relative paths from the environment or the command line resolve against the current directory,
as a shell user expects. Unknown sections and keys are errors wherever they come from: a typo must
not silently do nothing. Every error is a :class:`ConfigError` whose message starts with the key.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, get_args, get_type_hints
from urllib.parse import urlsplit

from dicomnode.aetitle import validate_ae_title
from dicomnode.errors import ConfigError
from dicomnode.model_location import resolve_model
from dicomnode.rules import Rule, SkipDerived
from dicomnode.vr import MAX_LENGTH, SERIES_DESCRIPTION_PREFIX_MAX, code_string_problem, string_problem

logger = logging.getLogger(__name__)

CONFIG_ENV = "DICOMNODE_CONFIG"
ENV_PREFIX = "DICOMNODE_"
DEFAULT_CONFIG = Path("config") / "dicomnode.toml"
DUPLICATE_POLICIES = ("reject",)
NODE_ROLES = ("all", "edge", "worker")  # see dicomnode.scheduler
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
DTYPES = ("auto", "float32", "float16", "bfloat16")
COMPILE_MODES = ("auto", "on", "off")
SERIES_NUMBERS = range(900, 1000)
SKIP_DERIVED_VALUES: tuple[SkipDerived, ...] = get_args(SkipDerived)  # ("secondary", "all", "none")
_PEER_NAME = re.compile(r"[A-Za-z0-9_-]+")
PEER_KINDS = ("dimse", "dicomweb")
_DICOMWEB_KEYS = (
    "url",
    "username",
    "password",
    "password_env",
    "bearer_token",
    "token_env",
    "tls_verify",
    "tls_ca_file",
)
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NO_OVERRIDES: Mapping[str, object] = MappingProxyType({})


def _hints(cls: type) -> dict[str, Any]:
    """Field annotations of a settings dataclass, evaluated (settings are built once: no cache)."""
    return get_type_hints(cls)


def _coerce(key: str, value: object, hint: Any) -> object:
    """Check ``value`` against a field's annotation; ints become floats, lists tuples, strs Paths."""
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: must be true or false, got {value!r}")
    elif hint in (int | None, float | None):
        if value is None or value == "":
            return None  # "" in the file means "not set"
        return _coerce(key, value, int if hint == int | None else float)
    elif hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: must be an integer, got {value!r}")
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ConfigError(f"{key}: must be a number, got {value!r}")
        return float(value)
    elif hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: must be a string, got {value!r}")
    elif hint is Path or hint == Path | None:
        if hint is not Path and (value is None or value == ""):
            return None  # "" in the file means "not set"
        if not isinstance(value, str | Path) or not str(value):
            raise ConfigError(f"{key}: must be a path, got {value!r}")
        path = Path(value)
        if not path.is_absolute():
            raise ConfigError(f"{key}: must be absolute once loaded (the loader resolves it), got {value!r}")
        return path
    elif hint == tuple[str, ...]:
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key}: must be a list of strings, got {value!r}")
        return tuple(value)
    return value


def _check_fields(obj: Any, section: str) -> None:
    """Type-check and normalise every field of a frozen settings dataclass in place."""
    for f in fields(obj):
        value = _coerce(f"{section}.{f.name}", getattr(obj, f.name), _hints(type(obj))[f.name])
        object.__setattr__(obj, f.name, value)


def _field_default(cls: type, name: str) -> object:
    return next(f.default for f in fields(cls) if f.name == name)


def _check_range(key: str, value: float, low: float | None = None, high: float | None = None) -> None:
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"{low}..{high}" if low is not None and high is not None else f">= {low}"
        raise ConfigError(f"{key}: must be {bounds}, got {value!r}")


def _check_positive(key: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{key}: must be > 0, got {value!r}")


def _check_host(key: str, value: str) -> None:
    if not value or any(c.isspace() for c in value):
        raise ConfigError(f"{key}: must be a host name or address without spaces, got {value!r}")


def _check_text(key: str, value: str, max_length: int) -> None:
    """A single value of a text VR such as LO, as the writer accepts it (:mod:`dicomnode.vr`)."""
    problem = string_problem(value, "LO", max_length)
    if problem:
        raise ConfigError(f"{key}: {problem} (1..{max_length} printable ASCII characters), got {value!r}")


def mask_database_url(url: str) -> str:
    """``url`` with any password replaced by ``***``, for logs and summaries."""
    from sqlalchemy.engine import make_url  # imported here: only URLs need it

    return make_url(url).render_as_string(hide_password=True)


def _database_backend(key: str, url: str) -> str:
    """The SQLAlchemy backend name of ``url`` ("sqlite", "postgresql"), or ConfigError naming ``key``."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).get_backend_name()
    except (ArgumentError, ValueError) as e:
        raise ConfigError(f"{key}: not a database URL ({e})") from e


@dataclass(frozen=True, kw_only=True)
class NodeSettings:
    """``[node]``: the node's own identity, network and durable storage."""

    storage_dir: Path
    ae_title: str = "SVDRR"
    bind_address: str = "127.0.0.1"
    port: int = 11112
    database_url: str = ""
    min_free_mb: int = 512
    max_associations: int = 10
    duplicate_policy: str = "reject"
    acse_timeout_s: float = 30.0
    dimse_timeout_s: float = 60.0
    network_timeout_s: float = 60.0
    request_timeout_s: float = 5.0
    max_associations_per_peer: int = 5
    maximum_pdu_bytes: int = 1048576
    receive_processes: int = 0
    name: str = ""
    role: str = "all"

    def __post_init__(self) -> None:
        _check_fields(self, "node")
        if self.role not in NODE_ROLES:
            raise ConfigError(f"node.role: must be one of {', '.join(NODE_ROLES)}, got {self.role!r}")
        if len(self.name) > 64 or any(c.isspace() or c == "/" for c in self.name):
            raise ConfigError(f"node.name: must be up to 64 characters without spaces or '/', got {self.name!r}")
        object.__setattr__(self, "ae_title", validate_ae_title(self.ae_title, "node.ae_title"))
        _check_host("node.bind_address", self.bind_address)
        _check_range("node.port", self.port, 1, 65535)
        _check_range("node.min_free_mb", self.min_free_mb, 0)
        _check_range("node.max_associations", self.max_associations, 1)
        _check_range("node.max_associations_per_peer", self.max_associations_per_peer, 0)
        _check_range("node.maximum_pdu_bytes", self.maximum_pdu_bytes, 4096, 2**32 - 1)
        _check_range("node.receive_processes", self.receive_processes, 0, 64)
        if self.duplicate_policy not in DUPLICATE_POLICIES:
            raise ConfigError(
                f"node.duplicate_policy: must be one of {DUPLICATE_POLICIES}, got {self.duplicate_policy!r}"
            )
        for key in ("acse_timeout_s", "dimse_timeout_s", "network_timeout_s", "request_timeout_s"):
            _check_positive(f"node.{key}", getattr(self, key))
        if self.database_url:
            backend = _database_backend("node.database_url", self.database_url)
            if backend not in ("sqlite", "postgresql"):
                raise ConfigError(f"node.database_url: must be a sqlite:// or postgresql:// URL, got {backend}://...")

    @property
    def node_name(self) -> str:
        """``name``, or ``<host name>-<AE title>`` when empty: unique per machine in a shared database."""
        if self.name:
            return self.name
        import socket

        return f"{socket.gethostname()}-{self.ae_title.strip()}"[:64]

    @property
    def effective_database_url(self) -> str:
        """``database_url``, or the SQLite file ``<storage_dir>/dicomnode.sqlite`` when it is empty."""
        return self.database_url or f"sqlite:///{self.storage_dir / 'dicomnode.sqlite'}"


@dataclass(frozen=True, kw_only=True)
class SecuritySettings:
    """``[security]``: who may associate, and TLS (PS3.15 Annex B.1, TLS Secure Transport)."""

    allowed_calling_ae_titles: tuple[str, ...] = ()
    require_called_ae_title: bool = True
    tls_certificate: Path | None = None
    tls_private_key: Path | None = None
    tls_ca_certificates: Path | None = None

    def __post_init__(self) -> None:
        _check_fields(self, "security")
        titles = tuple(
            validate_ae_title(title, f"security.allowed_calling_ae_titles[{i}]")
            for i, title in enumerate(self.allowed_calling_ae_titles)
        )
        object.__setattr__(self, "allowed_calling_ae_titles", titles)
        for key in ("tls_certificate", "tls_private_key", "tls_ca_certificates"):
            path = getattr(self, key)
            if path is not None and not path.is_file():
                raise ConfigError(f"security.{key}: file not found: {path}")
        if (self.tls_certificate is None) != (self.tls_private_key is None):
            missing = "tls_certificate" if self.tls_certificate is None else "tls_private_key"
            raise ConfigError(f"security.{missing}: tls_certificate and tls_private_key must be set together")

    @property
    def tls_enabled(self) -> bool:
        """Whether the node's own SCP serves TLS."""
        return self.tls_certificate is not None


@dataclass(frozen=True, kw_only=True)
class PeerSettings:
    """One ``[[peers]]`` entry: a DICOM node we send derived series to.

    ``kind = "dimse"`` (default) sends by C-STORE to ``ae_title@host:port`` and may ask for Storage
    Commitment (PS3.4 J); ``kind = "dicomweb"`` sends by STOW-RS (PS3.18 10.5) to ``url``, its host
    and port then derived from the URL. Secrets (``password``, ``bearer_token``) never appear in a
    repr or a log; ``password_env``/``token_env`` name an environment variable read at send time
    instead, so the file need not hold them (see :meth:`credentials`).
    """

    name: str
    kind: str = "dimse"
    ae_title: str = ""
    host: str = ""
    port: int = 0
    tls: bool = False
    storage_commitment: bool = False
    commitment_timeout_s: float = 300.0
    url: str = ""
    username: str = ""
    password: str = field(default="", repr=False)
    password_env: str = ""
    bearer_token: str = field(default="", repr=False)
    token_env: str = ""
    tls_verify: bool = True
    tls_ca_file: Path | None = None

    def __post_init__(self) -> None:
        where = f"peers[{self.name}]" if isinstance(self.name, str) and self.name else f"peers[{self.name!r}]"
        _check_fields(self, where)
        if not _PEER_NAME.fullmatch(self.name):
            raise ConfigError(f"{where}.name: must be letters, digits, '_' or '-', got {self.name!r}")
        if self.kind not in PEER_KINDS:
            raise ConfigError(f"{where}.kind: must be one of {', '.join(map(repr, PEER_KINDS))}, got {self.kind!r}")
        if self.kind == "dicomweb":
            self._check_dicomweb(where)
            return
        given = [k for k in _DICOMWEB_KEYS if getattr(self, k) != _field_default(PeerSettings, k)]
        if given:
            raise ConfigError(f"{where}.{given[0]}: only for kind = \"dicomweb\" peers")
        for key in ("ae_title", "port"):
            if not getattr(self, key):
                raise ConfigError(f"{where}.{key}: required")
        object.__setattr__(self, "ae_title", validate_ae_title(self.ae_title, f"{where}.ae_title"))
        _check_host(f"{where}.host", self.host)
        _check_range(f"{where}.port", self.port, 1, 65535)
        _check_positive(f"{where}.commitment_timeout_s", self.commitment_timeout_s)

    def _check_dicomweb(self, where: str) -> None:
        for key in ("ae_title", "host", "port", "tls", "storage_commitment"):
            if getattr(self, key) != _field_default(PeerSettings, key):
                raise ConfigError(f"{where}.{key}: not for kind = \"dicomweb\" peers (the url says where)")
        url = urlsplit(self.url)
        if url.username is not None or url.password is not None:
            raise ConfigError(f"{where}.url: put credentials in username/password keys, not in the URL")
        if url.scheme not in ("http", "https") or not url.hostname or url.query or url.fragment:
            raise ConfigError(
                f"{where}.url: must be the STOW-RS base URL, http(s)://host[:port]/path, got {self.url!r}"
            )
        try:
            port = url.port or (443 if url.scheme == "https" else 80)
        except ValueError as e:
            raise ConfigError(f"{where}.url: {e}, got {self.url!r}") from e
        object.__setattr__(self, "host", url.hostname)
        object.__setattr__(self, "port", port)
        basic = bool(self.username or self.password or self.password_env)
        bearer = bool(self.bearer_token or self.token_env)
        if basic and bearer:
            raise ConfigError(f"{where}: give username/password (basic) or a bearer token, not both")
        if basic and not self.username:
            raise ConfigError(f"{where}.username: required with a password")
        if basic and bool(self.password) == bool(self.password_env):
            raise ConfigError(f"{where}.password: give exactly one of password and password_env")
        if self.bearer_token and self.token_env:
            raise ConfigError(f"{where}.bearer_token: give exactly one of bearer_token and token_env")
        for key in ("password_env", "token_env"):
            value = getattr(self, key)
            if value and not _ENV_NAME.fullmatch(value):
                raise ConfigError(f"{where}.{key}: must name an environment variable, got {value!r}")
        if self.tls_ca_file is not None and not self.tls_ca_file.is_file():
            raise ConfigError(f"{where}.tls_ca_file: file not found: {self.tls_ca_file}")

    def credentials(self, env: Mapping[str, str] = os.environ) -> tuple[str, str] | str | None:
        """HTTP credentials of a DICOMweb peer: ``(username, password)`` for basic, a bearer token
        string, or None. ``*_env`` variables are read now; a missing one is a :class:`ConfigError`."""
        if self.username:
            password = self.password or env.get(self.password_env)
            if password is None:
                raise ConfigError(f"peers[{self.name}].password_env: ${self.password_env} is not set")
            return (self.username, password)
        if self.bearer_token or self.token_env:
            token = self.bearer_token or env.get(self.token_env)
            if not token:
                raise ConfigError(f"peers[{self.name}].token_env: ${self.token_env} is not set")
            return token
        return None


@dataclass(frozen=True, kw_only=True)
class EngineSettings:
    """``[engine]``: the SV-DRR model and how it runs."""

    model: Path
    device: str = "auto"
    dtype: str = "auto"
    # Not set (None): the model's recommended values, from its dicomnode-model.json.
    steps: int | None = None
    guidance_scale: float | None = None
    max_batch: int | str = 8  # views per chunk, or "auto": from free GPU memory (synthesis.fastpath)
    seed: int = 0
    # The consistency gate's threshold, overriding the model's (dicomnode-model.json); None: the model's.
    consistency_threshold: float | None = None
    compile: str = "auto"  # torch.compile transformer + VAE decoder: auto (CUDA only), on, off
    cuda_graphs: bool = True  # CUDA graphs for the compiled transformer
    pad_batches: bool = True  # when compiling: pad short chunks to static shapes (no recompiles)
    warm_up: bool = True  # compile and run every chunk shape once when the worker loads the model

    def __post_init__(self) -> None:
        _check_fields(self, "engine")
        threshold = self.consistency_threshold
        if threshold == "":  # "" in the file means "not set": the model's own threshold
            object.__setattr__(self, "consistency_threshold", threshold := None)
        if threshold is not None:
            if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not math.isfinite(threshold):
                raise ConfigError(f"engine.consistency_threshold: must be a number, got {threshold!r}")
            object.__setattr__(self, "consistency_threshold", float(threshold))
        if self.compile not in COMPILE_MODES:
            raise ConfigError(f"engine.compile: must be one of {COMPILE_MODES}, got {self.compile!r}")
        if self.max_batch != "auto" and (isinstance(self.max_batch, bool) or not isinstance(self.max_batch, int)):
            raise ConfigError(f'engine.max_batch: must be an integer >= 1 or "auto", got {self.max_batch!r}')
        if not DEVICE_PATTERN.fullmatch(self.device):
            raise ConfigError(f"engine.device: must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"engine.dtype: must be one of {DTYPES}, got {self.dtype!r}")
        if self.steps is not None:
            _check_range("engine.steps", self.steps, 1)
        if self.guidance_scale is not None:
            _check_range("engine.guidance_scale", self.guidance_scale, 1.0)
        if self.max_batch != "auto":
            _check_range("engine.max_batch", self.max_batch, 1)
        _check_range("engine.seed", self.seed, 0, 2**63 - 1)

    def dtype_for(self, device_type: str) -> str:
        """The dtype name to run with on ``device_type`` ("cuda" or "cpu"): resolves ``"auto"``."""
        if self.dtype != "auto":
            return self.dtype
        return "bfloat16" if device_type == "cuda" else "float32"


@dataclass(frozen=True, kw_only=True)
class SchedulerSettings:
    """``[scheduler]``: when studies are dispatched and how failures are retried."""

    settle_s: float = 5.0
    max_attempts: int = 5
    backoff_initial_s: float = 10.0
    backoff_max_s: float = 600.0
    workers: int = 1
    poll_interval_s: float = 1.0
    delivery_max_attempts: int = 10
    lease_s: float = 60.0
    backoff_jitter: float = 0.1
    max_jobs_per_batch: int = 1

    def __post_init__(self) -> None:
        _check_fields(self, "scheduler")
        _check_range("scheduler.lease_s", self.lease_s, 5.0)
        _check_range("scheduler.backoff_jitter", self.backoff_jitter, 0.0, 1.0)
        _check_range("scheduler.max_jobs_per_batch", self.max_jobs_per_batch, 1)
        _check_range("scheduler.settle_s", self.settle_s, 0)
        _check_range("scheduler.max_attempts", self.max_attempts, 1)
        _check_positive("scheduler.backoff_initial_s", self.backoff_initial_s)
        _check_range("scheduler.backoff_max_s", self.backoff_max_s, self.backoff_initial_s)
        _check_range("scheduler.workers", self.workers, 1)
        _check_positive("scheduler.poll_interval_s", self.poll_interval_s)
        _check_range("scheduler.delivery_max_attempts", self.delivery_max_attempts, 1)


@dataclass(frozen=True, kw_only=True)
class OutputSettings:
    """``[output]``: fixed attributes of every derived series (see dicom-conventions.md)."""

    series_number: int = 901
    modality: str = "OT"
    series_description_prefix: str = "SYNTHETIC"
    manufacturer: str = "dicomnode"
    sweep_series_number: int = 902  # the rotation sweep of a rule with sweep = true
    sweep_frame_time_ms: float = 250.0  # Frame Time of the sweep, ms per frame
    recall_series_number: int = 990  # the rejection notes of `dicomnode recall`

    def __post_init__(self) -> None:
        _check_fields(self, "output")
        _check_range("output.series_number", self.series_number, SERIES_NUMBERS.start, SERIES_NUMBERS.stop - 1)
        for key in ("sweep_series_number", "recall_series_number"):
            _check_range(f"output.{key}", getattr(self, key), SERIES_NUMBERS.start, SERIES_NUMBERS.stop - 1)
        _check_range("output.sweep_frame_time_ms", self.sweep_frame_time_ms, 1, 60_000)
        if code_string_problem(self.modality):
            raise ConfigError(f"output.modality: must be a Code String (A-Z, 0-9, 1..16), got {self.modality!r}")
        # Series Description is LO (64 characters); the prefix leaves room for the writer's view label.
        _check_text("output.series_description_prefix", self.series_description_prefix, SERIES_DESCRIPTION_PREFIX_MAX)
        _check_text("output.manufacturer", self.manufacturer, MAX_LENGTH["LO"])


@dataclass(frozen=True, kw_only=True)
class LoopPreventionSettings:
    """``[loop_prevention]``: which received instances are never processed (see :mod:`dicomnode.rules`).

    ``skip_derived`` decides on Image Type (0008,0008) (PS3.3 C.7.6.1.1.2), one of
    :data:`SKIP_DERIVED_VALUES`:

    * ``"secondary"`` (default): skip DERIVED\\SECONDARY -- our own output, Secondary Captures and
      other reformatted or processed secondary images. Processed radiographs from CR readers are
      very often DERIVED\\PRIMARY (a real chest PA among them), and those must still be processed;
    * ``"all"``: skip every instance whose value 1 is DERIVED (the strict reading);
    * ``"none"``: never skip on Image Type.

    For files written when the key was a boolean, ``true`` means ``"all"`` and ``false`` ``"none"``.
    Synthetic Data = YES and, with ``skip_own_device``, our own output are skipped whatever
    ``skip_derived`` says. ``skip_synthetic`` exists only so the file can say it: Synthetic Data =
    YES is always skipped.
    """

    skip_derived: SkipDerived = "secondary"
    skip_own_device: bool = True
    skip_synthetic: bool = True

    def __post_init__(self) -> None:
        skip_derived: object = self.skip_derived
        if isinstance(skip_derived, bool):  # the key's old boolean form
            skip_derived = "all" if skip_derived else "none"
        if skip_derived not in SKIP_DERIVED_VALUES:
            raise ConfigError(
                f"loop_prevention.skip_derived: must be one of {', '.join(map(repr, SKIP_DERIVED_VALUES))} "
                f"(or true = 'all', false = 'none'), got {self.skip_derived!r}"
            )
        object.__setattr__(self, "skip_derived", skip_derived)
        _check_fields(self, "loop_prevention")
        if not self.skip_synthetic:
            raise ConfigError(
                "loop_prevention.skip_synthetic: cannot be turned off; synthetic input is never processed"
            )


@dataclass(frozen=True, kw_only=True)
class HttpSettings:
    """``[http]``: the operator console, REST API, metrics and health endpoints (:mod:`dicomnode.console`).

    Bound to a loopback address it may run without login; bound to any other address it needs
    ``api_token`` or ``username`` + ``password_hash`` (``python -m dicomnode.console.passwords``).
    ``tls = true`` serves HTTPS with the node's ``security.tls_certificate`` and key.
    """

    enabled: bool = True
    bind_address: str = "127.0.0.1"
    port: int = 11180
    api_token: str = ""
    username: str = ""
    password_hash: str = ""
    tls: bool = False

    def __post_init__(self) -> None:
        _check_fields(self, "http")
        _check_host("http.bind_address", self.bind_address)
        _check_range("http.port", self.port, 0, 65535)
        if bool(self.username) != bool(self.password_hash):
            raise ConfigError("http.password_hash: username and password_hash must be set together")
        if self.password_hash and not self.password_hash.startswith("pbkdf2_sha256$"):
            raise ConfigError(
                "http.password_hash: must be a pbkdf2_sha256$... hash (python -m dicomnode.console.passwords)"
            )
        if self.api_token and len(self.api_token) < 16:
            raise ConfigError("http.api_token: must be at least 16 characters")
        if self.enabled and not self.authentication and not is_loopback(self.bind_address):
            raise ConfigError(
                f"http.bind_address: {self.bind_address!r} is not a loopback address; the console refuses to "
                "serve it without authentication (set http.api_token or http.username + http.password_hash)"
            )

    @property
    def authentication(self) -> bool:
        """Whether requests must authenticate (a token or a user is configured)."""
        return bool(self.api_token or self.username)


def is_loopback(host: str) -> bool:
    """Whether ``host`` names only this machine (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, kw_only=True)
class Settings:
    """The whole site configuration. Build it with :func:`load_settings`."""

    node: NodeSettings
    engine: EngineSettings
    security: SecuritySettings = SecuritySettings()
    peers: tuple[PeerSettings, ...] = ()
    scheduler: SchedulerSettings = SchedulerSettings()
    output: OutputSettings = OutputSettings()
    loop_prevention: LoopPreventionSettings = LoopPreventionSettings()
    http: HttpSettings = HttpSettings()
    rules: tuple[Rule, ...] = ()
    source: Path | None = None  # the TOML file these settings came from, if any

    def __post_init__(self) -> None:
        object.__setattr__(self, "peers", tuple(self.peers))
        object.__setattr__(self, "rules", tuple(self.rules))
        for section, cls in _SECTIONS.items():
            if not isinstance(getattr(self, section), cls):
                raise ConfigError(f"{section}: must be {cls.__name__}, got {getattr(self, section)!r}")
        for section, cls in _LISTS.items():
            items = getattr(self, section)
            if not all(isinstance(item, cls) for item in items):
                raise ConfigError(f"{section}: must hold only {cls.__name__} objects")
            names = [item.name for item in items]
            for name in names:
                if names.count(name) > 1:
                    raise ConfigError(f"{section}[{name}].name: duplicate name {name!r}")
        peer_names = {peer.name for peer in self.peers}
        for rule in self.rules:
            for destination in rule.destinations:
                if destination not in peer_names:
                    raise ConfigError(
                        f"rules[{rule.name}].destinations: unknown peer {destination!r} "
                        f"(peers: {', '.join(sorted(peer_names)) or 'none'})"
                    )

    def peer(self, name: str) -> PeerSettings:
        """The peer called ``name``; :class:`KeyError` naming it when there is none."""
        for peer in self.peers:
            if peer.name == name:
                return peer
        raise KeyError(f"no peer named {name!r} (peers: {', '.join(p.name for p in self.peers) or 'none'})")


_SECTIONS: dict[str, type] = {
    "node": NodeSettings,
    "security": SecuritySettings,
    "engine": EngineSettings,
    "scheduler": SchedulerSettings,
    "output": OutputSettings,
    "loop_prevention": LoopPreventionSettings,
    "http": HttpSettings,
}
_LISTS: dict[str, type] = {"peers": PeerSettings, "rules": Rule}
# Defaults for the two required paths when the file leaves them out (relative to the file's folder).
# engine.model defaults to the packaged demo model, wherever the file is (unless it has a folder "demo").
_PATH_DEFAULTS = {("node", "storage_dir"): "var", ("engine", "model"): "demo"}


def _is_path(hint: Any) -> bool:
    return hint is Path or hint == Path | None


def _known(where: str, key: str, known: Mapping[str, Any] | dict[str, type]) -> None:
    if key not in known:
        close = difflib.get_close_matches(key, list(known), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f" (known: {', '.join(known)})"
        raise ConfigError(f"{where}: unknown key {key!r}{hint}")


def _resolve(key: str, value: object, base: Path) -> object:
    """A path value from some source, made absolute against ``base``; ``""`` stays (= not set)."""
    if not isinstance(value, str | Path):
        raise ConfigError(f"{key}: must be a path string, got {value!r}")
    if str(value) == "":
        return ""
    if key == "engine.model":  # a packaged model's name ("demo") or a folder (dicomnode.model_location)
        return resolve_model(value, base)
    return (base / Path(value).expanduser()).resolve()


def resolve_config_path(path: Path | None, env: Mapping[str, str] = os.environ) -> Path:
    """The file to read: ``path``, else ``$DICOMNODE_CONFIG``, else ``config/dicomnode.toml`` (absolute)."""
    chosen = path if path is not None else Path(env[CONFIG_ENV]) if env.get(CONFIG_ENV) else DEFAULT_CONFIG
    return chosen.expanduser().resolve()


def _read_file(path: Path) -> dict[str, Any]:
    """Read and shape-check the TOML file, resolving its relative paths against its folder."""
    try:
        with path.open("rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError as e:
        raise ConfigError(f"configuration file not found: {path} (give --config or set {CONFIG_ENV})") from e
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: cannot read TOML: {e}") from e
    data: dict[str, Any] = {}
    for section, value in raw.items():
        _known("top level", section, {**_SECTIONS, **_LISTS})
        if section in _LISTS:
            if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
                raise ConfigError(f"{section}: must be an array of tables, written [[{section}]]")
            hints = _hints(_LISTS[section])
            resolve = [k for k, hint in hints.items() if _is_path(hint)]  # e.g. peers' tls_ca_file
            data[section] = [
                {k: _resolve(f"{section}.{k}", v, path.parent) if k in resolve else v for k, v in item.items()}
                for item in value
            ]
            continue
        if not isinstance(value, dict):
            raise ConfigError(f"{section}: must be a table, written [{section}]")
        hints = _hints(_SECTIONS[section])
        table: dict[str, Any] = {}
        for key, item in value.items():
            _known(section, key, hints)
            table[key] = _resolve(f"{section}.{key}", item, path.parent) if _is_path(hints[key]) else item
        data[section] = table
    for (section, key), default in _PATH_DEFAULTS.items():
        data.setdefault(section, {}).setdefault(key, _resolve(f"{section}.{key}", default, path.parent))
    return data


def _env_value(hint: Any, text: str) -> object:
    if hint is str or _is_path(hint):
        return text
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _set(data: dict[str, Any], section: str, key: str, value: object, origin: str) -> str:
    """Put one override into ``data`` after checking the name; returns ``"section.key"``."""
    if section in _LISTS:
        raise ConfigError(f"{origin}: [[{section}]] entries can only be set in the configuration file")
    _known(origin, section, _SECTIONS)
    hints = _hints(_SECTIONS[section])
    _known(origin, key, hints)
    if _is_path(hints[key]):
        value = _resolve(f"{section}.{key}", value, Path.cwd())
    data.setdefault(section, {})[key] = value
    return f"{section}.{key}"


def _build_list(section: str, items: list[dict[str, Any]]) -> tuple[Any, ...]:
    cls = _LISTS[section]
    hints = _hints(cls)
    built = []
    for i, item in enumerate(items):
        name = item.get("name")
        where = f"{section}[{name}]" if isinstance(name, str) and name else f"{section}[{i}]"
        for key in item:
            _known(where, key, hints)
        for f in fields(cls):
            if f.default is MISSING and f.default_factory is MISSING and f.name not in item:
                raise ConfigError(f"{where}.{f.name}: required")
        built.append(cls(**item))
    return tuple(built)


def load_settings(
    path: Path | None = None,
    env: Mapping[str, str] = os.environ,
    overrides: Mapping[str, object] = _NO_OVERRIDES,
) -> Settings:
    """Load, layer and validate the site configuration (file, then environment, then ``overrides``).

    ``env`` variables named ``DICOMNODE_<SECTION>__<KEY>`` override the file; other ``DICOMNODE_``
    variables without ``__`` (such as ``DICOMNODE_CONFIG``) are not settings and are ignored.
    ``overrides`` maps ``"section.key"`` to a value from a command-line flag; ``None`` values are
    skipped, so commands can pass their flags unfiltered.
    """
    source = resolve_config_path(path, env)
    data = _read_file(source)
    origins: dict[str, str] = {}
    for name, text in sorted(env.items()):
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        section, _, key = name[len(ENV_PREFIX) :].lower().partition("__")
        hint = _hints(_SECTIONS[section]).get(key) if section in _SECTIONS else None
        dotted = _set(data, section, key, _env_value(hint, text), f"environment {name}")
        origins[dotted] = f"environment {name}"
    for dotted, value in overrides.items():
        if value is None:
            continue
        section, _, key = dotted.partition(".")
        origins[_set(data, section, key, value, f"override {dotted!r}")] = "command line"
    try:
        parts: dict[str, Any] = {s: cls(**data.get(s, {})) for s, cls in _SECTIONS.items()}
        parts.update({s: _build_list(s, data.get(s, [])) for s in _LISTS})
        settings = Settings(**parts, source=source)
    except ConfigError as e:
        origin = next((o for k, o in origins.items() if re.match(rf"{re.escape(k)}[:\[]", str(e))), None)
        raise ConfigError(f"{e} (set by {origin})" if origin else f"{e} (in {source})") from e
    logger.debug("configuration loaded from %s", source)
    return settings
