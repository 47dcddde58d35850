"""Shared test fixtures: real peers on loopback, free ports, temporary folders."""

from __future__ import annotations

import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.dicom_nodes import Node


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


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[Callable[..., Node]]:
    """``start_node(**options)`` starts an in-process node (:func:`tests.dicom_nodes.node_factory`);
    all stop when the test ends. A test module may define its own ``node`` or ``start_node``."""
    from tests.dicom_nodes import node_factory  # it imports this module

    with node_factory(tmp_path) as start:
        yield start


@pytest.fixture
def node(start_node: Callable[..., Node]) -> Node:
    """A node on the default options."""
    return start_node()
