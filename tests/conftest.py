"""Shared test fixtures: real peers on loopback, free ports, temporary folders."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dcmtk(tool: str) -> str:
    """Path of a Debian dcmtk tool; /usr/bin first, since a Python shim may shadow the name."""
    for candidate in (Path("/usr/bin") / tool, Path("/bin") / tool):
        if candidate.exists():
            return str(candidate)
    found = shutil.which(tool)
    if not found:
        pytest.fail(f"dcmtk tool {tool!r} is not installed (apt-get install dcmtk)")
    return found


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random SV-DRR model (VAE + CLIP, learned sigma) in the published layout, 32 px."""
    from tests.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_pixel_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny pixel-space model without VAE and CLIP, like the demo model, 64 px."""
    from tests.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-pixel-model"), resolution=64, vae=False, clip=False)


def received_row(session, uid: str):  # type: ignore[no-untyped-def]
    """A minimal received-instance row (storage.instances.record_instance) for storage tests."""
    from storage.instances import record_instance

    return record_instance(
        session,
        sop_instance_uid=uid,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
        study_instance_uid="1.2.3",
        series_instance_uid="1.2.3.4",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        origin="received",
        path=f"{uid}.dcm",
        sha256="0" * 64,
        size_bytes=1,
        synthetic=False,
    )
