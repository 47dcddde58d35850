"""Library chatter stays out of the node's log at the default level and at -v; -vv shows it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dicomnode.log_config import LIBRARY_LOGGERS

# Configure logging as ``dicomnode serve`` does (the CLI set-up, then INFO for a server when not -v),
# build real Secondary Captures from a real CR, and log from the node's own code.
_SCRIPT = """
import logging, sys
import numpy as np, pydicom
from pydicom.data import get_testdata_file
from dicomnode.cli import configure_logging
from dicomnode.derived import GeneratorInfo, build_derived_instances

verbosity = int(sys.argv[1])
configure_logging(verbosity)
if verbosity == 0:
    logging.getLogger().setLevel(logging.INFO)
source = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
pixels = [np.full((64, 48), 100 * i, dtype=np.uint16) + np.arange(48, dtype=np.uint16) for i in (1, 2)]
generator = GeneratorInfo(model_name="m", model_version="1", model_identity="ab" * 32, node_version="0")
build_derived_instances(
    source, pixels, 12, None, None, [(-30.0, 0.0), (30.0, 0.0)], generator, seed=0, steps=1, guidance_scale=1.0
)
"""


def log_of(verbosity: int) -> str:
    run = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(verbosity)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert run.returncode == 0, run.stderr
    return run.stderr


@pytest.mark.parametrize("verbosity", [0, 1])
def test_default_and_v_log_the_node_not_its_libraries(verbosity: int) -> None:
    log = log_of(verbosity)
    assert "INFO dicomnode.derived: built 2 synthetic instances" in log
    assert " highdicom" not in log, log


def test_vv_shows_library_lines() -> None:
    log = log_of(2)
    assert "INFO highdicom.base: copy attributes of module" in log
    assert log.count("INFO highdicom") >= 2 * 7  # seven per instance, as the issue counted
    assert "pynetdicom" in LIBRARY_LOGGERS and "highdicom" in LIBRARY_LOGGERS
