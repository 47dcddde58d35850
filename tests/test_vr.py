"""One source for DICOM value limits: what the configuration accepts, the writer accepts."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from dicomnode.config import OutputSettings
from dicomnode.derived import GeneratorInfo, build_derived_instances, series_description_for
from dicomnode.errors import ConfigError, SynthesisError
from dicomnode.vr import SERIES_DESCRIPTION_PREFIX_MAX, string_problem

GENERATOR = GeneratorInfo(
    model_name="demo", model_version="abc", model_identity="ab" * 32, node_version="0.1.0"
)
# Views whose exact label is the longest the writer can be asked for: it must still fit.
AWKWARD_VIEWS = [(-89.123456, -12.345678), (88.765432, 45.678901)] + [(float(a), 0.0) for a in range(-80, 80, 3)]


def config_accepts(prefix: str) -> bool:
    try:
        OutputSettings(series_description_prefix=prefix)
    except ConfigError:
        return False
    return True


def writer_accepts(prefix: str, views: list[tuple[float, float]]) -> bool:
    source = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"), stop_before_pixels=True)
    pixels = [np.zeros((64, 64), np.uint16) for _ in views]
    try:
        (first, *_) = build_derived_instances(
            source, pixels, 12, None, None, views, GENERATOR, seed=1, steps=20, guidance_scale=3.0,
            series_description_prefix=prefix,
        )  # fmt: skip
    except SynthesisError:
        return False
    description = str(first.SeriesDescription)
    assert description.startswith(prefix) and len(description) <= 64
    assert f"({len(views)})" in description or len(views) == 1, "the label is never cut off"
    return True


@pytest.mark.parametrize("length", [1, 23, 24, 25, 28, 32, 33])
def test_config_check_and_writer_agree_on_the_prefix_length(length: int) -> None:
    prefix = ("SYNTHETIC-VIEW-" * 3)[:length]  # today's bug: 25..32 passed the check, failed the writer
    accepted = config_accepts(prefix)
    assert accepted == writer_accepts(prefix, AWKWARD_VIEWS[:3])
    assert accepted == (length <= SERIES_DESCRIPTION_PREFIX_MAX)


@pytest.mark.parametrize("prefix", ["SYNTHÈSE", "A\\B", "TAB\tHERE", " "])
def test_repertoire_and_separator_are_refused_by_both(prefix: str) -> None:
    assert string_problem(prefix, "LO") is not None
    assert not config_accepts(prefix)
    assert not writer_accepts(prefix, [(30.0, 0.0)])


def test_the_longest_prefix_keeps_the_whole_label_even_for_awkward_angles() -> None:
    prefix = "P" * SERIES_DESCRIPTION_PREFIX_MAX
    assert writer_accepts(prefix, AWKWARD_VIEWS)
    description = series_description_for(prefix, AWKWARD_VIEWS)
    assert description.endswith(f"({len(AWKWARD_VIEWS)})") and "az -89..89 el -12..46" in description
    # Exact angles are kept whenever they fit.
    assert series_description_for(prefix, [(22.5, -10.0)]) == prefix + " AI view az 22.5 el -10"


def test_shipped_prefix_is_accepted_by_both() -> None:
    assert config_accepts("SYNTHETIC") and writer_accepts("SYNTHETIC", [(30.0, 0.0), (-30.0, 0.0)])
