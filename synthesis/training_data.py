"""Training pairs from a DRR dataset folder: (PA input, target view, relative pose).

The dataset folder is the one :mod:`synthesis.drr_dataset` writes: view 0 of each (case,
augmentation) is the PA view, the model's input; every other view is a target. Each image is
min-max normalised on its own after resizing, as the method's DRRs were (svdrr-spec.md, "Views and
data"); the pose is :meth:`synthesis.views.View.pose` (condition minus target), the single place
that encodes the sign.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dicomnode.errors import SynthesisError
from synthesis.drr_dataset import IndexRow, load_index
from synthesis.views import View

logger = logging.getLogger(__name__)

RowFilter = Callable[[IndexRow], bool]


def load_drr_image(path: Path, resolution: int) -> np.ndarray:
    """A 16-bit grayscale PNG -> float32 (resolution, resolution) in [0, 1], min-max normalised."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            pixels = np.asarray(im, dtype=np.float32)
    except (OSError, ValueError) as e:
        raise SynthesisError(f"cannot read DRR image {path}: {e}") from e
    if pixels.ndim != 2:
        raise SynthesisError(f"DRR image {path} must be single-channel, got shape {pixels.shape}")
    x = torch.from_numpy(pixels)[None, None]
    if x.shape[-2:] != (resolution, resolution):
        x = F.interpolate(
            x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True
        )
    lo, hi = x.min(), x.max()
    x = (x - lo) / (hi - lo) if float(hi - lo) > 0 else torch.zeros_like(x)
    return x[0, 0].numpy().astype(np.float32)


@dataclass(frozen=True)
class TrainingPair:
    """One example: PA ``condition`` and ``target`` images (H, W) in [0, 1], float32 ``pose`` [4]."""

    condition: np.ndarray
    target: np.ndarray
    pose: np.ndarray


class DrrTrainingPairs(Sequence[TrainingPair]):
    """Every target row of a DRR dataset paired with the PA view of its (case, augmentation).

    ``include`` selects target rows (e.g. hold out azimuths or cases); rows whose PA view is not in
    the index (an unfinished render) are skipped with a warning. PA images are cached decoded.
    """

    def __init__(self, data_dir: str | Path, resolution: int, include: RowFilter | None = None):
        if resolution < 1:
            raise SynthesisError(f"resolution must be >= 1, got {resolution}")
        self.data_dir = Path(data_dir)
        self.resolution = int(resolution)
        rows = load_index(self.data_dir)
        self._pa = {(r.case, r.augmentation): r for r in rows if r.view_id == 0}
        targets = [r for r in rows if r.view_id != 0 and (include is None or include(r))]
        orphans = [r for r in targets if (r.case, r.augmentation) not in self._pa]
        if orphans:
            logger.warning("%d target views have no PA view in %s; skipped", len(orphans), self.data_dir)
        self.rows: tuple[IndexRow, ...] = tuple(r for r in targets if (r.case, r.augmentation) in self._pa)
        if not self.rows:
            raise SynthesisError(f"no training pairs (PA + target view) in {self.data_dir}")
        self._pa_cache: dict[tuple[str, int], np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> TrainingPair:  # type: ignore[override]
        row = self.rows[index]
        key = (row.case, row.augmentation)
        if key not in self._pa_cache:
            self._pa_cache[key] = load_drr_image(self.data_dir / self._pa[key].path, self.resolution)
        target = load_drr_image(self.data_dir / row.path, self.resolution)
        pose = np.asarray(View(row.azimuth, row.elevation).pose(), dtype=np.float32)
        return TrainingPair(self._pa_cache[key], target, pose)

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(condition [B,1,H,W], target [B,1,H,W], pose [B,4]) float32 tensors in [0, 1]."""
        pairs = [self[i] for i in indices]
        condition = torch.from_numpy(np.stack([p.condition for p in pairs]))[:, None]
        target = torch.from_numpy(np.stack([p.target for p in pairs]))[:, None]
        pose = torch.from_numpy(np.stack([p.pose for p in pairs]))
        return condition, target, pose


def exclude_azimuths(azimuths: Sequence[float], tolerance: float = 1e-6) -> RowFilter:
    """A filter holding out views at the given azimuths (degrees), e.g. for validation."""
    held_out = [float(a) for a in azimuths]
    return lambda row: all(abs(row.azimuth - a) > tolerance for a in held_out)


def exclude_cases(cases: Sequence[str]) -> RowFilter:
    """A filter holding out whole cases (the paper holds out the last 16 patients)."""
    held_out = set(cases)
    return lambda row: row.case not in held_out


def exclude_augmentations(augmentations: Sequence[int]) -> RowFilter:
    """A filter holding out augmented copies of the volume (unseen augmentations for evaluation)."""
    held_out = {int(a) for a in augmentations}
    return lambda row: int(row.augmentation) not in held_out


def all_of(*filters: RowFilter) -> RowFilter:
    """A row passes when every filter passes it."""
    return lambda row: all(f(row) for f in filters)
