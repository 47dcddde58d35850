"""The input-use checks (grey input, flipped PA) and the mirror convention they rest on.

Predictors that know the answer, or know nothing, show that the checks measure what they say: an
oracle that uses its input passes both, a memoriser of one patient and a constant predictor fail
both. A render of a real CT and its mirror image confirms the flip check's azimuth sign.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import astuple
from pathlib import Path

import numpy as np
import pytest
import torch

from dicomnode.errors import SynthesisError
from synthesis.drr_dataset import load_index
from synthesis.input_checks import (
    FLIP_MAX_AZIMUTH,
    FLIP_SEED_OFFSET,
    GREY_LEVEL,
    Predictor,
    ViewCheck,
    format_checks,
    read_checks,
    run_input_checks,
    summarise_checks,
)
from synthesis.metrics import psnr, ssim
from synthesis.training_data import load_drr_image
from tests.lattice_dataset import write_lattice_dataset

SIZE = 32


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_lattice_dataset(tmp_path_factory.mktemp("lattice"), size=SIZE)


def _key(case: str, azimuth: float, elevation: float) -> tuple[str, float, float]:
    return case, round(azimuth, 6) + 0.0, round(elevation, 6) + 0.0


def _images(data: Path) -> dict[tuple[str, float, float], np.ndarray]:
    return {_key(r.case, r.azimuth, r.elevation): load_drr_image(data / r.path, SIZE) for r in load_index(data)}


def oracle(data: Path) -> Predictor:
    """Knows every patient: answers the PA with its views, the mirrored PA with the mirrored views,
    and an input it has never seen (the grey one) with that input."""
    images = _images(data)
    cases = sorted({case for case, _, _ in images})

    def predict(image: np.ndarray, views: Sequence[tuple[float, float]]) -> np.ndarray:
        for case in cases:
            pa = images[_key(case, 0, 0)]
            if np.array_equal(image, pa):
                return np.stack([images[_key(case, a, e)] for a, e in views])
            if np.array_equal(image, np.fliplr(pa)):
                missing = np.zeros_like(pa)  # the mirror of a view the data lacks: never scored
                return np.stack([np.fliplr(images.get(_key(case, -a, e), missing)) for a, e in views])
        return np.stack([image] * len(views))

    return predict


def memoriser(data: Path, case: str = "c0") -> Predictor:
    """Answers every input with the views of one training patient: ignores its input."""
    images = _images(data)

    def predict(image: np.ndarray, views: Sequence[tuple[float, float]]) -> np.ndarray:
        return np.stack([images[_key(case, a, e)] for a, e in views])

    return predict


def constant(image: np.ndarray, views: Sequence[tuple[float, float]]) -> np.ndarray:
    return np.full((len(views), *image.shape), 0.25, dtype=np.float32)


def _wide_el0(row) -> bool:  # type: ignore[no-untyped-def]
    return abs(row.azimuth) >= 30 and row.elevation == 0


def test_an_oracle_that_uses_its_input_passes_both(dataset: Path, tmp_path: Path) -> None:
    checks = run_input_checks(oracle(dataset), dataset, tmp_path, SIZE, _wide_el0, settings={"seed": 3})
    g, f = checks.grey, checks.flip
    assert g.n == 3 * 5 and len(checks.views) == 15  # three inputs x (+-30, +-45, 75) at elevation 0
    assert g.psnr_pa == math.inf and g.ssim_pa == pytest.approx(1.0)
    assert math.isfinite(g.psnr_grey) and g.psnr_drop == math.inf and g.passed
    assert f.n == 3 * 4  # 75 has no mirrored view in the data
    assert f.ssim_to_mirrored_truth == pytest.approx(1.0) and f.ssim_to_unflipped_output < 0.9
    assert f.fraction_closer_to_mirrored_truth == 1.0 and f.passed and checks.passed

    by_view = {(v.case, v.azimuth): v for v in checks.views}
    assert math.isnan(by_view[("c1", 75.0)].ssim_flip_to_mirrored_truth)
    # The grey figures are the grey image's own scores against the truth: the oracle echoes it.
    truth = load_drr_image(dataset / "images/c1_000_0007.png", SIZE)  # view 7: (-30, 0)
    assert by_view[("c1", -30.0)].psnr_grey == psnr(np.full_like(truth, GREY_LEVEL), truth)
    assert by_view[("c1", -30.0)].ssim_grey == ssim(np.full_like(truth, GREY_LEVEL), truth)
    # How much mirroring the patient changes the view: the truth against the mirrored truth.
    mirrored = np.fliplr(load_drr_image(dataset / "images/c1_000_0008.png", SIZE))  # view 8: (+30, 0)
    assert by_view[("c1", -30.0)].ssim_truth_to_mirrored_truth == ssim(truth, mirrored) < 0.9
    assert f.ssim_truth_to_mirrored_truth < 0.9 and f.near_lateral is None  # no view beyond 60 degrees

    document = json.loads(checks.json_path.read_text())
    assert document["passed"] is True and document["inputs"] == 3 and document["settings"] == {"seed": 3}
    assert document["grey"]["level"] == GREY_LEVEL and document["flip"]["n"] == 12
    assert document["flip"]["ssim_to_unflipped_output"] == f.ssim_to_unflipped_output
    written = read_checks(checks.csv_path)
    assert len(written) == 15
    for a, b in zip(written, checks.views, strict=True):  # NaN != NaN, so not a == b
        assert astuple(a)[:4] == astuple(b)[:4]
        np.testing.assert_array_equal(np.array(astuple(a)[4:]), np.array(astuple(b)[4:]))
    assert summarise_checks(written) == (g, f)
    assert "PASS" in format_checks(checks) and "FAIL" not in format_checks(checks)


def _view(azimuth: float, to_mirrored_truth: float, to_unflipped_output: float, truth_to_mirror: float) -> ViewCheck:
    flip = (to_mirrored_truth, to_unflipped_output, 18.0, 17.0, truth_to_mirror)
    return ViewCheck("c", 0, azimuth, 0.0, 20.0, 0.5, 15.0, 0.4, *flip)


def test_near_lateral_views_are_reported_but_not_judged() -> None:
    # At a lateral the mirrored patient's view is nearly the patient's own: the right answer to the
    # flipped PA is nearly the unflipped one, so those views cannot decide the check either way.
    oblique = [_view(a, 0.55, 0.50, 0.45) for a in (-60.0, -30.0, 30.0, 60.0)]
    lateral = [_view(a, 0.45, 0.65, 0.77) for a in (-90.0, -75.0, 75.0, 90.0)]
    missing = _view(45.0, math.nan, math.nan, math.nan)  # no mirrored view in the data
    assert FLIP_MAX_AZIMUTH == 60.0
    _, flip = summarise_checks([*oblique, *lateral, missing])
    assert flip.n == 4 and flip.ssim_to_mirrored_truth == pytest.approx(0.55) and flip.passed
    assert flip.ssim_truth_to_mirrored_truth == pytest.approx(0.45)
    near = flip.near_lateral
    assert near is not None and near.n == 4 and near.ssim_to_unflipped_output == pytest.approx(0.65)
    assert near.fraction_closer_to_mirrored_truth == 0.0 and near.ssim_truth_to_mirrored_truth == pytest.approx(0.77)
    assert flip.to_dict()["near_lateral"]["n"] == 4 and flip.to_dict()["passed"] is True
    # Judged over every view with a mirror, the laterals would outvote the obliques.
    _, only_lateral = summarise_checks(lateral)
    assert only_lateral.n == 0 and not only_lateral.passed and only_lateral.near_lateral is not None
    # A memoriser's obliques still fail: its flipped answer is its unflipped one.
    _, memorised = summarise_checks([_view(a, 0.45, 1.0, 0.45) for a in (-45.0, 45.0)] + lateral)
    assert not memorised.passed


def test_a_memoriser_of_one_patient_fails_both(dataset: Path, tmp_path: Path) -> None:
    held_out = lambda row: row.case != "c0" and _wide_el0(row)  # noqa: E731
    checks = run_input_checks(memoriser(dataset), dataset, tmp_path, SIZE, held_out)
    g, f = checks.grey, checks.flip
    assert g.n == 10 and all(v.psnr_pa == v.psnr_grey and v.ssim_pa == v.ssim_grey for v in checks.views)
    assert g.psnr_drop == 0.0 and not g.passed
    # The same answer to the flipped PA as to the PA: identical to its unflipped output.
    assert f.ssim_to_unflipped_output == pytest.approx(1.0) and f.psnr_to_unflipped_output == math.inf
    assert f.ssim_to_mirrored_truth < 0.9 and f.fraction_closer_to_mirrored_truth == 0.0 and not f.passed
    assert json.loads(checks.json_path.read_text())["passed"] is False
    assert format_checks(checks).count("FAIL") == 2


def with_texture(predict: Predictor, seed: int, sigma: float = 0.2) -> Predictor:
    """``predict`` plus a sampler's noise-made texture: drawn from the seed and each view's angles."""

    def textured(image: np.ndarray, views: Sequence[tuple[float, float]]) -> np.ndarray:
        out = predict(image, views)
        for i, (azimuth, elevation) in enumerate(views):
            rng = np.random.default_rng([seed, int(azimuth + 360), int(elevation + 360)])
            out[i] = np.clip(out[i] + rng.normal(0.0, sigma, out[i].shape), 0.0, 1.0)
        return out

    return textured


def test_the_flipped_pa_is_sampled_with_its_own_noise(dataset: Path, tmp_path: Path) -> None:
    # A model that uses its input but draws texture from the noise: with the PA's noise the flipped
    # output shares that texture with the unflipped one and would fail; with its own noise it passes.
    sampler = with_texture(oracle(dataset), seed=0)
    shared = run_input_checks(sampler, dataset, tmp_path / "shared", SIZE, _wide_el0)
    assert shared.flip.ssim_to_unflipped_output > shared.flip.ssim_to_mirrored_truth and not shared.flip.passed
    own = with_texture(oracle(dataset), seed=0 + FLIP_SEED_OFFSET)
    checks = run_input_checks(sampler, dataset, tmp_path / "own", SIZE, _wide_el0, predict_flipped=own)
    assert checks.flip.ssim_to_mirrored_truth > checks.flip.ssim_to_unflipped_output and checks.flip.passed
    # A memoriser with the same texture still fails: its two outputs differ only by the noise.
    held_out = lambda row: row.case != "c0" and _wide_el0(row)  # noqa: E731
    memorising = with_texture(memoriser(dataset), seed=0)
    other_noise = with_texture(memoriser(dataset), seed=FLIP_SEED_OFFSET)
    checks = run_input_checks(memorising, dataset, tmp_path / "mem", SIZE, held_out, predict_flipped=other_noise)
    assert checks.flip.ssim_to_unflipped_output > checks.flip.ssim_to_mirrored_truth and not checks.flip.passed
    assert not checks.grey.passed


def test_a_constant_predictor_fails_both(dataset: Path, tmp_path: Path) -> None:
    checks = run_input_checks(constant, dataset, tmp_path, SIZE)  # every target view, all elevations
    assert checks.grey.n == 3 * 15 and checks.grey.psnr_drop == 0.0 and not checks.grey.passed
    assert checks.flip.n == 3 * 12 and checks.flip.ssim_to_unflipped_output == pytest.approx(1.0)
    assert not checks.flip.passed and not checks.passed


def test_the_checks_refuse_an_empty_selection_or_a_wrong_shape(dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(SynthesisError, match="no target views"):
        run_input_checks(constant, dataset, tmp_path, SIZE, lambda row: False)

    def too_small(image: np.ndarray, views: Sequence[tuple[float, float]]) -> np.ndarray:
        return np.zeros((len(views), 8, 8), dtype=np.float32)

    with pytest.raises(SynthesisError, match="expected"):
        run_input_checks(too_small, dataset, tmp_path, SIZE, _wide_el0)


# --- the mirror convention, on a real CT -----------------------------------------------------------


def test_mirroring_the_patient_maps_azimuth_to_minus_azimuth() -> None:
    """fliplr(render(mirrored CT, (a, e))) == render(CT, (-a, e)): the flip check's mirrored truth.

    The bundled chest CT (heart on the left, so not mirror-symmetric), decimated to 64 x 64 x 67
    voxels and mirrored left-right about its centre, rendered at 32 px.
    """
    from synthesis.drr import CtVolume, DrrGeometry, example_ct, render_views

    ct = example_ct()
    step = (8, 8, 2)
    hu = ct.hu[:: step[0], :: step[1], :: step[2]].contiguous()
    affine = ct.affine.copy()
    affine[:3, :3] = affine[:3, :3] * np.array(step, dtype=float)
    assert abs(affine[0, 0]) > 0 and np.count_nonzero(affine[:3, 0]) == 1  # voxel axis i runs along RAS x
    volume = CtVolume(hu, affine, ct.patient, "decimated")
    mirrored = CtVolume(torch.flip(hu, dims=[0]), affine, ct.patient, "mirrored")
    geometry = DrrGeometry.for_size(32)
    views = [(-60.0, 0.0), (30.0, 0.0), (45.0, 15.0), (45.0, -30.0)]
    original = render_views(volume, geometry, views + [(-a, e) for a, e in views])
    of_mirror = render_views(mirrored, geometry, views)
    n = len(views)
    for i, view in enumerate(views):
        flipped = torch.flip(of_mirror[i], dims=[1])
        assert float((flipped - original[n + i]).abs().max()) < 0.01, view  # the same view, mirrored
        assert float((flipped - original[i]).abs().mean()) > 0.05, view  # not the same azimuth
