"""The window a synthetic view opens with: robust percentiles of the body, not the whole range.

A view spans the whole 12-bit range (black around the body, a few saturated bone pixels), so a
window from its minimum to its maximum, or from percentiles of the whole image, is about
WW 4096 / WL 2048: the body occupies the middle grey levels and looks washed out. A viewer of a
radiograph shows the body with its darkest tissue near black and its densest bone near white, and
that is what this window does, from the view's own pixels:

1. background: values within 2 % of the image's range above its minimum (the black surround
   the model draws around the body, as its min-max normalised training DRRs have, and the pad
   around a non-square input) are not body;
2. the window spans the body's 10th to 99th percentile: the lowest tenth is the soft, blurred
   rim where body meets background (the model draws it as a dark halo around the body), the top
   1 % hot spots (markers, saturated bone) that a maximum would let dominate. On the demo sample
   this takes the six views from WW 3934..4055 to WW 2807..3554 with the lungs dark and the
   spine and heart bright, as the input shows them;
3. when fewer than 5 % of the pixels (or fewer than 16) are body, the whole image's percentiles
   are used; a constant image gets width 1.

The window is LINEAR (PS3.3 C.11.2.1.2.1) and given in stored values: values at or below the lower
bound show black, values above the upper bound white. Numpy only, so ``dicomnode`` can use it
without the engine's dependencies.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["BACKGROUND_FRACTION", "BODY_PERCENTILES", "body_mask", "body_window"]

#: Values within this fraction of the image's range above its minimum are background.
BACKGROUND_FRACTION = 0.02
#: The body percentiles the window spans (lower bound shows black, upper bound white).
BODY_PERCENTILES = (10.0, 99.0)
_MIN_BODY_FRACTION = 0.05
_MIN_BODY_PIXELS = 16


def body_mask(pixels: np.ndarray) -> np.ndarray:
    """True where ``pixels`` belong to the body by rule 1, or everywhere when too little does (rule 3)."""
    values = np.asarray(pixels, dtype=np.float64)
    low, high = float(values.min()), float(values.max())
    mask = values > low + BACKGROUND_FRACTION * (high - low)
    if mask.sum() < max(_MIN_BODY_PIXELS, _MIN_BODY_FRACTION * values.size):
        return np.ones(values.shape, dtype=bool)
    return mask


def body_window(pixels: np.ndarray) -> tuple[float, float]:
    """Window Center and Width (stored values, LINEAR) spanning the body's 10th..99th percentile."""
    values = np.asarray(pixels, dtype=np.float64)
    if values.size == 0 or not np.isfinite(values).all():
        raise ValueError("body_window needs a non-empty array of finite values")
    lo, hi = np.percentile(values[body_mask(values)], BODY_PERCENTILES)
    lo_i, hi_i = math.floor(lo), math.ceil(hi)
    # LINEAR: x <= c - 0.5 - (w - 1) / 2 = lo_i is black, x > c - 0.5 + (w - 1) / 2 = hi_i is white.
    return (lo_i + hi_i + 1) / 2, float(hi_i - lo_i + 1)
