"""The consistency gate: may the model's output for this input go into a patient's study?

Two checks, both before anything is written or sent, both ending a job ``refused`` with a precise
reason (:class:`dicomnode.errors.InputRefused`), never retried:

1. **Intended inputs**, from the source's header alone, before any pixel work: Modality
   (0008,0060), Body Part Examined (0018,0015), View Position (0018,5101), Photometric
   Interpretation (0028,0004), Rows/Columns, and the requested elevations against the model's
   trained range. The model declares them in ``dicomnode-model.json`` (:mod:`synthesis.model_meta`),
   matched as the site's rules match: [] = any, "" in a list admits a header without the value.
2. **Consistency score**: how well the model grounds the prepared input
   (:mod:`synthesis.consistency`); below the model's threshold the input is refused. A model
   without a calibrated threshold refuses everything, saying so, until it is calibrated or the site
   sets ``[engine] consistency_threshold``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import pydicom

from dicomnode.errors import InputRefused, ModelLoadError
from synthesis.model_meta import META_FILENAME, ModelMeta, ModelMetaError, load_model_meta

logger = logging.getLogger(__name__)


def model_meta_for(folder: Path, threshold_override: float | None = None) -> ModelMeta:
    """The model's metadata with the site's threshold override applied; a malformed file is a
    :class:`ModelLoadError` (the site fixes the folder, the job waits for it)."""
    try:
        meta = load_model_meta(folder)
    except ModelMetaError as e:
        raise ModelLoadError(str(e)) from e
    return meta.with_threshold(threshold_override)


def _header(ds: pydicom.Dataset, keyword: str) -> str:
    return str(ds.get(keyword, "") or "").strip().upper()


def intended_input_problem(ds: pydicom.Dataset, elevations: Sequence[float], meta: ModelMeta) -> str | None:
    """Why the source is outside the model's intended inputs, or None when it is inside."""
    intended = meta.intended
    for keyword, allowed in (
        ("Modality", intended.modalities),
        ("BodyPartExamined", intended.body_parts),
        ("ViewPosition", intended.view_positions),
        ("PhotometricInterpretation", intended.photometric_interpretations),
    ):
        if not allowed:
            continue
        value = _header(ds, keyword)
        named = "/".join(a for a in allowed if a) + (" or absent" if "" in allowed else "")
        if not value and "" not in allowed:
            return f"{keyword} is absent; the model is intended for {named}"
        if value not in allowed:
            return f"{keyword} {value} is outside the model's intended inputs ({named})"
    rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows < intended.min_rows or columns < intended.min_columns:
        return f"image {rows}x{columns} is smaller than the model's minimum {intended.min_rows}x{intended.min_columns}"
    low, high = intended.elevation_range
    outside = sorted({float(e) for e in elevations if not low <= float(e) <= high})
    if outside:
        shown = ", ".join(f"{e:g}" for e in outside)
        return f"elevation {shown} is outside the model's trained range {low:g}..{high:g} degrees"
    return None


def check_intended_input(ds: pydicom.Dataset, elevations: Sequence[float], meta: ModelMeta) -> None:
    """Raise :class:`InputRefused` when the source or the request is outside the intended inputs."""
    problem = intended_input_problem(ds, elevations, meta)
    if problem:
        raise InputRefused(problem)


def check_score(value: float, method: str, meta: ModelMeta) -> None:
    """Raise :class:`InputRefused` when ``value`` (higher = better grounded) is below the threshold."""
    unit = "" if method == "identity-ssim" else " dB"
    threshold = meta.gate.threshold
    if threshold is None:
        raise InputRefused(
            f"the model is not calibrated for the consistency gate (no threshold in {META_FILENAME}, "
            f"no [engine] consistency_threshold); score {method} {value:.2f}{unit}",
            score=value,
            method=method,
        )
    if value < threshold:
        raise InputRefused(
            f"consistency score {method} {value:.2f}{unit} is below the model's threshold "
            f"{threshold:.2f}{unit}: the model cannot ground its output in this input",
            score=value,
            method=method,
        )
