"""What a model folder says about itself: recommended settings, intended inputs, its gate.

A small JSON file, ``dicomnode-model.json``, sits beside ``model_index.json``::

    {
      "format": 1,
      "recommended": {"steps": 20, "guidance_scale": 1.5},
      "intended_inputs": {
        "modalities": ["CR", "DX"], "body_parts": ["CHEST", ""], "view_positions": ["PA", ""],
        "photometric_interpretations": ["MONOCHROME1", "MONOCHROME2"],
        "min_rows": 64, "min_columns": 64, "elevation_range": [0, 0]
      },
      "gate": {"method": "denoise", "threshold": 20.7, "calibration": {...}}
    }

The lists match as the site's rules do: case-insensitively and exactly; an empty list (or null)
allows any value; an input without the attribute matches only an empty list or one containing ""
(otherwise it is refused: the node cannot tell that the input is intended).
``gate.threshold`` is in the method's unit (dB for the denoising scores, SSIM for identity-ssim);
``calibration`` records how it was chosen (data, n, mean, std, percentiles, date, command).

A model folder **without** the file gets :data:`DEFAULT_META`, which is conservative: the
intended inputs of the SV-DRR method (CR/DX chest PA, MONOCHROME1/2, at least 64 px, elevations
within +-90 degrees; Body Part and View Position may be absent, as the shipped rule allows), the
sampler defaults of the published code (20 steps, guidance 3.0), and a gate with **no threshold**:
every job is refused with a reason saying that the model is not calibrated, until the model gets
the file (``benchmarks/calibrate_gate.py``) or the site sets ``[engine] consistency_threshold``.
The gate is never silently disabled.

This module imports neither torch nor ``dicomnode``, so the command line can read a model's
defaults cheaply.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

META_FILENAME = "dicomnode-model.json"
GATE_METHODS: tuple[str, ...] = ("denoise", "denoise-uncond", "identity-ssim")


@dataclass(frozen=True)
class IntendedInputs:
    """The inputs a model was made for; an empty tuple allows any value."""

    modalities: tuple[str, ...] = ("CR", "DX")
    body_parts: tuple[str, ...] = ("CHEST", "")
    view_positions: tuple[str, ...] = ("PA", "")
    photometric_interpretations: tuple[str, ...] = ("MONOCHROME1", "MONOCHROME2")
    min_rows: int = 64
    min_columns: int = 64
    elevation_range: tuple[float, float] = (-90.0, 90.0)


@dataclass(frozen=True)
class GateSettings:
    """The consistency gate: score ``method`` and the ``threshold`` below which input is refused
    (None: not calibrated, everything is refused); ``calibration`` is the record behind it."""

    method: str = "denoise"
    threshold: float | None = None
    calibration: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelMeta:
    """Everything ``dicomnode-model.json`` says; ``source`` is the file, or None for the defaults."""

    steps: int = 20
    guidance_scale: float = 3.0
    intended: IntendedInputs = IntendedInputs()
    gate: GateSettings = GateSettings()
    source: Path | None = None

    def sampler(self, steps: int | None, guidance_scale: float | None) -> tuple[int, float]:
        """The steps and guidance to sample with: those given (a flag, the site's ``[engine]``), else these."""
        return (
            self.steps if steps is None else steps,
            self.guidance_scale if guidance_scale is None else guidance_scale,
        )

    def with_threshold(self, threshold: float | None) -> ModelMeta:
        """The same metadata with the gate threshold replaced (a site override); None keeps it."""
        if threshold is None:
            return self
        return replace(self, gate=replace(self.gate, threshold=float(threshold)))


DEFAULT_META = ModelMeta()


class ModelMetaError(ValueError):
    """``dicomnode-model.json`` exists but is malformed: the message names the file and the key."""


def _fail(path: Path, message: str) -> ModelMetaError:
    return ModelMetaError(f"{path}: {message}")


def _strings(path: Path, key: str, value: Any, default: tuple[str, ...]) -> tuple[str, ...]:
    if value is _ABSENT:
        return default
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail(path, f"intended_inputs.{key} must be a list of strings, got {value!r}")
    return tuple(v.strip().upper() for v in value)


_ABSENT = object()


def _number(path: Path, key: str, value: Any, low: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _fail(path, f"{key} must be a finite number, got {value!r}")
    if low is not None and value < low:
        raise _fail(path, f"{key} must be >= {low}, got {value!r}")
    return float(value)


def load_model_meta(folder: str | Path) -> ModelMeta:
    """The metadata of the model in ``folder``; :data:`DEFAULT_META` when it has no file.

    Raises :class:`ModelMetaError` naming the key when the file exists but is malformed.
    """
    path = Path(folder) / META_FILENAME
    if not path.is_file():
        return DEFAULT_META
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(path, f"cannot be read as JSON: {e}") from e
    if not isinstance(raw, dict):
        raise _fail(path, "must hold a JSON object")
    recommended = raw.get("recommended") or {}
    intended = raw.get("intended_inputs") or {}
    gate = raw.get("gate") or {}
    if not all(isinstance(x, dict) for x in (recommended, intended, gate)):
        raise _fail(path, "recommended, intended_inputs and gate must be JSON objects")

    steps = recommended.get("steps", DEFAULT_META.steps)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise _fail(path, f"recommended.steps must be a positive integer, got {steps!r}")
    guidance = _number(path, "recommended.guidance_scale", recommended.get("guidance_scale", 3.0), 1.0)

    d = IntendedInputs()
    lists = {
        key: _strings(path, key, intended.get(key, _ABSENT), getattr(d, key))
        for key in ("modalities", "body_parts", "view_positions", "photometric_interpretations")
    }
    sizes = {}
    for key in ("min_rows", "min_columns"):
        value = intended.get(key, getattr(d, key))
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise _fail(path, f"intended_inputs.{key} must be a positive integer, got {value!r}")
        sizes[key] = value
    elevation_range = intended.get("elevation_range", list(d.elevation_range))
    if not isinstance(elevation_range, list) or len(elevation_range) != 2:
        raise _fail(path, f"intended_inputs.elevation_range must be [min, max] degrees, got {elevation_range!r}")
    low, high = (_number(path, "intended_inputs.elevation_range", v) for v in elevation_range)
    if low > high:
        raise _fail(path, f"intended_inputs.elevation_range {elevation_range!r} has min > max")

    method = gate.get("method", "denoise")
    if method not in GATE_METHODS:
        raise _fail(path, f"gate.method must be one of {', '.join(GATE_METHODS)}, got {method!r}")
    threshold = gate.get("threshold")
    if threshold is not None:
        threshold = _number(path, "gate.threshold", threshold)
    calibration = gate.get("calibration") or {}
    if not isinstance(calibration, dict):
        raise _fail(path, "gate.calibration must be a JSON object")

    return ModelMeta(
        steps=steps,
        guidance_scale=guidance,
        intended=IntendedInputs(**lists, **sizes, elevation_range=(low, high)),
        gate=GateSettings(method=method, threshold=threshold, calibration=dict(calibration)),
        source=path,
    )
