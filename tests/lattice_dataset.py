"""A tiny DRR dataset folder on an azimuth x elevation lattice, written in the real format (tests only).

Each case is a left-right asymmetric "patient": a bright blob that moves sideways with azimuth and up
and down with elevation, a dimmer bar on one side, and a gradient, all shifted per case. So views of
one case differ from each other, from the other cases, and from their own mirror images.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from synthesis.drr_dataset import INDEX_COLUMNS

AZIMUTHS = (-45.0, -30.0, 30.0, 45.0, 75.0)  # 75 has no mirror (-75) in the data, on purpose
ELEVATIONS = (-15.0, 0.0, 15.0)
LATTICE = tuple((a, e) for e in ELEVATIONS for a in AZIMUTHS)


def truth(case_number: int, azimuth: float, elevation: float, size: int) -> np.ndarray:
    """The 'DRR' of case ``case_number`` at (azimuth, elevation), float64 in [0, 1]."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    shift = 0.06 * case_number
    cx = 0.45 + shift + 0.3 * math.sin(math.radians(azimuth))
    cy = 0.45 - 0.4 * math.sin(math.radians(elevation))
    blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 0.01)
    bar_x = 0.7 - 0.2 * math.sin(math.radians(azimuth)) - shift
    bar = 0.5 * ((np.abs(xx - bar_x) < 0.06) & (yy > 0.2 + shift))
    image = blob + bar + 0.2 * xx * (1 + case_number)
    return (image - image.min()) / (image.max() - image.min())


def write_lattice_dataset(folder: Path, cases: int = 3, size: int = 32) -> Path:
    """Cases ``c0``, ``c1``, ... (augmentation 0): view 0 the PA, then the lattice; 16-bit PNGs."""
    (folder / "images").mkdir(parents=True)
    lines = [",".join(INDEX_COLUMNS)]
    for number in range(cases):
        case = f"c{number}"
        for view_id, (azimuth, elevation) in enumerate(((0.0, 0.0), *LATTICE)):
            pixels = np.rint(truth(number, azimuth, elevation, size) * 65535).astype(np.int32)
            path = f"images/{case}_000_{view_id:04d}.png"
            Image.fromarray(pixels, mode="I").convert("I;16").save(folder / path)
            lines.append(f"P{number},{case},0,{view_id},{azimuth:.10g},{elevation:.10g},{path}")
    (folder / "index.csv").write_text("\n".join(lines) + "\n")
    return folder
