"""The deployment files: the example site loads, and each unit runs the role it is named after."""

from __future__ import annotations

from pathlib import Path

from dicomnode.config import load_settings

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def test_example_site_is_a_valid_postgresql_configuration() -> None:
    settings = load_settings(DEPLOY / "site" / "site.toml")
    assert settings.node.database_url.startswith("postgresql://")
    assert settings.node.storage_dir.is_absolute()
    assert settings.scheduler.lease_s == 60 and settings.scheduler.workers == 2


def test_units_run_their_roles() -> None:
    units = {p.name: p.read_text() for p in (DEPLOY / "systemd").glob("*.service")}
    assert "serve --role edge" in units["dicomnode-edge.service"]
    assert "serve --role worker" in units["dicomnode-worker@.service"]
    assert "DICOMNODE_NODE__NAME=%i" in units["dicomnode-worker@.service"]
    assert "serve --role all" in units["dicomnode.service"]
