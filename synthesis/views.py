"""Target views: validation, the SV-DRR pose encoding, and per-view seeds.

Angles are in degrees at the interface and radians inside the pose vector. The input is always the
PA view (condition azimuth = elevation = 0); the pose is **condition minus target**
(svdrr-spec.md, "Inference" step 3):

    p = [theta_c - theta_t, sin(phi_c - phi_t), cos(phi_c - phi_t), 0]
      = [-elevation, sin(-azimuth), cos(azimuth), 0]

Getting the sign wrong mirrors the output, so this module is the single place that encodes it.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

from dicomnode.errors import SynthesisError

MAX_ABS_ANGLE_DEG = 90.0


@dataclass(frozen=True)
class View:
    """One target view: azimuth (about the long axis; +-90 are laterals) and elevation, degrees."""

    azimuth: float
    elevation: float = 0.0

    def __post_init__(self) -> None:
        for name in ("azimuth", "elevation"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise SynthesisError(f"view {name} must be a finite number of degrees, got {value!r}")
            if abs(value) > MAX_ABS_ANGLE_DEG:
                raise SynthesisError(f"view {name} must be within +-90 degrees, got {value!r}")
            object.__setattr__(self, name, float(value))

    def pose(self) -> tuple[float, float, float, float]:
        """The 4-vector for this target, condition (PA, 0/0) minus target."""
        d_theta = 0.0 - math.radians(self.elevation)
        d_phi = 0.0 - math.radians(self.azimuth)
        return (d_theta, math.sin(d_phi), math.cos(d_phi), 0.0)

    def label(self) -> str:
        return f"az {self.azimuth:+g} el {self.elevation:+g}"


def make_views(azimuths: Sequence[float], elevations: Sequence[float] | None = None) -> tuple[View, ...]:
    """Pair azimuths with elevations (default 0 each); at least one view."""
    azimuths = list(azimuths)
    if not azimuths:
        raise SynthesisError("at least one target azimuth is required")
    if elevations is None or len(elevations) == 0:
        elevations = [0.0] * len(azimuths)
    if len(elevations) != len(azimuths):
        raise SynthesisError(
            f"elevations must be empty or one per azimuth: {len(elevations)} elevations "
            f"for {len(azimuths)} azimuths"
        )
    return tuple(View(float(a), float(e)) for a, e in zip(azimuths, elevations, strict=True))


def view_seed(seed: int, view: View) -> int:
    """A per-view seed that depends on the request seed and the view's own angles only.

    So a view's noise, and hence its pixels, are the same whichever other views share the request:
    derived instance UIDs (source, weights, angles, seed) never name two different images.
    """
    key = f"svdrr-view-seed:{int(seed)}:{view.azimuth:.6f}:{view.elevation:.6f}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") & ((1 << 63) - 1)
