"""``dicomnode config check``: load and validate the site configuration, print what it says.

Run it after every edit of the site file and before restarting the node: the node itself loads the
same file the same way, so a file that passes here starts (see :func:`dicomnode.config.load_settings`
for where the file is looked for and how the environment overrides it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TextIO

from dicomnode.cli.exitcodes import ExitCode
from dicomnode.config import CONFIG_ENV, DEFAULT_CONFIG, Settings, load_settings, mask_database_url
from dicomnode.errors import ConfigError
from dicomnode.model_location import model_path_error, model_waiting_reason
from synthesis.model_meta import ModelMetaError, load_model_meta


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``-c/--config PATH`` (default: ``$DICOMNODE_CONFIG``, else ``config/dicomnode.toml``)."""
    parser.add_argument(
        "-c",
        "--config",
        type=Path,
        default=None,
        metavar="PATH",
        help=f"site configuration file (default: ${CONFIG_ENV}, else {DEFAULT_CONFIG} in the current folder)",
    )


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``config`` command and its ``check`` action."""
    parser = subparsers.add_parser(
        "config",
        help="check the site configuration",
        description="Work with the site configuration (TOML file, DICOMNODE_<SECTION>__<KEY> variables).",
    )
    parser.set_defaults(func=lambda args: _usage(parser))
    actions = parser.add_subparsers(dest="config_action", metavar="ACTION")
    check = actions.add_parser(
        "check",
        help="load and validate the configuration, print a summary",
        description="Load and validate the configuration (file, then environment) and print a summary.",
    )
    add_config_argument(check)
    check.set_defaults(func=check_command)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return ExitCode.USAGE


def _sampler(settings: Settings) -> str:
    """Steps and guidance as the worker will use them: set in the file, or the model's recommended."""
    engine = settings.engine
    try:
        meta = load_model_meta(engine.model) if engine.model.is_dir() else None
    except ModelMetaError:
        meta = None  # reported by the model checks
    parts = []
    for name, value, recommended in (
        ("steps", engine.steps, meta.steps if meta else None),
        ("guidance", engine.guidance_scale, meta.guidance_scale if meta else None),
    ):
        if value is not None:
            parts.append(f"{name} {value:g}")
        else:
            parts.append(f"{name} {recommended:g} (the model's)" if recommended is not None else f"{name} the model's")
    return ", ".join(parts)


def summary(settings: Settings) -> list[str]:
    """Short human-readable lines describing ``settings``; database passwords are masked."""
    node, security, engine = settings.node, settings.security, settings.engine
    allowed = ", ".join(security.allowed_calling_ae_titles) or "any"
    lines = [
        f"configuration: {settings.source or '(built in code)'}",
        f"node: AE {node.ae_title} on {node.bind_address}:{node.port}, "
        f"TLS {'on' if security.tls_enabled else 'off'}, calling AEs allowed: {allowed}",
        f"storage: {node.storage_dir}",
        f"database: {mask_database_url(node.effective_database_url)}",
        f"model: {engine.model} ({'no model_index.json yet' if model_waiting_reason(engine.model) else 'found'}), "
        f"device {engine.device}, dtype {engine.dtype}, {_sampler(settings)}",
        f"peers: {len(settings.peers)}",
    ]
    http = settings.http
    login = " and ".join(k for k, v in (("token", http.api_token), ("user", http.username)) if v) or "none (loopback)"
    console = f"http{'s' if http.tls else ''}://{http.bind_address}:{http.port}/, login {login}"
    lines.insert(5, f"console: {console if http.enabled else 'off'}")
    lines += [
        f"  {p.name}: STOW-RS {p.url}"
        if p.kind == "dicomweb"
        else f"  {p.name}: {p.ae_title} at {p.host}:{p.port}{' (TLS)' if p.tls else ''}"
        f"{' (storage commitment)' if p.storage_commitment else ''}"
        for p in settings.peers
    ]
    lines.append(f"rules: {len(settings.rules)}")
    low, high = _trained_elevations(engine.model)
    for rule in settings.rules:
        angles = ", ".join(f"{az:g}" if not el else f"{az:g}/{el:g}" for az, el in rule.views)
        where = ", ".join(rule.destinations) or "store only"
        state = "" if rule.enabled else " (disabled)"
        lines.append(f"  {rule.name}{state}: {len(rule.views)} views [{angles}] -> {where}")
        untrained = sorted({el for _, el in rule.views if not low <= el <= high})
        if untrained:  # the gate refuses these jobs (dicomnode.gate): say so before the first one arrives
            shown = ", ".join(f"{el:g}" for el in untrained)
            lines.append(f"    elevation {shown} is outside the model's trained range {low:g}..{high:g}: jobs refused")
    return lines


def _trained_elevations(model: Path) -> tuple[float, float]:
    """The elevations the model was trained on (dicomnode-model.json); a malformed file shows no limit here."""
    try:
        return load_model_meta(model).intended.elevation_range
    except ModelMetaError:
        return (-90.0, 90.0)


def check_command(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Load the configuration named by ``args.config``; print a summary (0) or the error (CONFIG)."""
    try:
        settings = load_settings(args.config)
        if problem := model_path_error(settings.engine.model):  # a path naming nothing is a typo, not "missing"
            raise ConfigError(f"{problem} (in {settings.source})")
    except ConfigError as e:
        print(f"dicomnode: configuration error: {e}", file=sys.stderr)
        return ExitCode.CONFIG
    print("\n".join(summary(settings)), file=out or sys.stdout)
    return ExitCode.OK
