"""PSNR/SSIM, the baselines and the evaluation run on a tiny synthetic DRR dataset (CPU, seconds)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dicomnode import cli
from dicomnode.cli.exitcodes import ExitCode
from dicomnode.errors import SynthesisError
from synthesis.drr_dataset import INDEX_COLUMNS
from synthesis.evaluate import (
    MeanScore,
    evaluate,
    foreshortened,
    format_grid,
    format_table,
    identity,
    read_metrics,
    summarise,
)
from synthesis.metrics import gaussian_window, patch_grid_ratio, psnr, ssim
from tests.tiny_model import make_tiny_model

RNG = np.random.default_rng(7)


# --- metrics ---------------------------------------------------------------------------------------


def test_identical_images_psnr_inf_ssim_one() -> None:
    x = RNG.random((32, 32))
    assert psnr(x, x.copy()) == math.inf
    assert ssim(x, x.copy()) == pytest.approx(1.0, abs=1e-12)


def test_constant_offset_of_a_tenth_is_20_db() -> None:
    x = RNG.random((24, 24)) * 0.9
    assert psnr(x + 0.1, x) == pytest.approx(20.0, abs=1e-9)
    assert psnr(x, x + 0.1, data_range=2.0) == pytest.approx(20 + 20 * math.log10(2), abs=1e-9)


def test_ssim_of_constant_images_is_the_luminance_term() -> None:
    """By hand: no variance anywhere, so SSIM = (2ab + C1) / (a^2 + b^2 + C1), C1 = (0.01 * 1)^2."""
    a, b, c1 = 0.5, 0.25, 1e-4
    assert ssim(np.full((11, 11), a), np.full((11, 11), b)) == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1))


def _ssim_by_loops(x: np.ndarray, y: np.ndarray) -> float:
    """The Wang et al. formula written out window by window with the explicit 11 x 11 weights."""
    w1 = gaussian_window()
    assert len(w1) == 11 and w1.sum() == pytest.approx(1.0) and w1[5] == w1.max()
    window = np.outer(w1, w1)
    c1, c2 = 0.01**2, 0.03**2
    values = []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            px, py = x[i : i + 11, j : j + 11], y[i : i + 11, j : j + 11]
            mx, my = (window * px).sum(), (window * py).sum()
            vx, vy = (window * (px - mx) ** 2).sum(), (window * (py - my) ** 2).sum()
            cxy = (window * (px - mx) * (py - my)).sum()
            values.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


def test_ssim_equals_the_formula_window_by_window() -> None:
    x = RNG.random((13, 15))
    y = np.clip(x + RNG.normal(0, 0.2, x.shape), 0, 1)
    assert ssim(x, y) == pytest.approx(_ssim_by_loops(x, y), abs=1e-12)


def test_ssim_symmetric_and_below_one_for_noise() -> None:
    yy, xx = np.mgrid[0:40, 0:40] / 40
    clean = np.exp(-((xx - 0.5) ** 2 + (yy - 0.5) ** 2) / 0.05)
    noisy = np.clip(clean + RNG.normal(0, 0.1, clean.shape), 0, 1)
    assert ssim(noisy, clean) == pytest.approx(ssim(clean, noisy), abs=1e-15)
    assert 0 < ssim(noisy, clean) < 0.9
    louder = np.clip(clean + RNG.normal(0, 0.3, clean.shape), 0, 1)
    assert ssim(louder, clean) < ssim(noisy, clean)


def test_ssim_matches_scikit_image() -> None:
    metrics = pytest.importorskip("skimage.metrics")
    x = RNG.random((40, 36))
    y = np.clip(x * 0.7 + RNG.normal(0, 0.1, x.shape) + 0.1, 0, 1)
    theirs = metrics.structural_similarity(
        x, y, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
    )
    assert ssim(x, y) == pytest.approx(theirs, abs=1e-6)


def test_metrics_refuse_mismatched_or_tiny_images() -> None:
    with pytest.raises(SynthesisError, match=r"\(8, 8\) and \(8, 9\)"):
        psnr(np.zeros((8, 8)), np.zeros((8, 9)))
    with pytest.raises(SynthesisError, match="at least 11"):
        ssim(np.zeros((10, 30)), np.zeros((10, 30)))
    with pytest.raises(SynthesisError, match="NaN"):
        psnr(np.full((4, 4), np.nan), np.zeros((4, 4)))


# --- baselines -------------------------------------------------------------------------------------


def _block(size: int = 64, left: int = 16, right: int = 48) -> np.ndarray:
    """Bright columns [left, right) on a 0 background, a dimmer stripe so rows differ."""
    image = np.zeros((size, size), dtype=np.float32)
    image[:, left:right] = 1.0
    image[size // 2 :, left:right] = 0.5
    return image


def _bright_width(image: np.ndarray) -> float:
    """Width of the content in columns, counting partial (edge-averaged) columns fractionally."""
    profile = image[0]
    return float(profile.sum() / profile.max())


def test_patch_grid_ratio_sees_block_edges_only_at_their_period() -> None:
    yy, xx = np.mgrid[0:64, 0:64] / 64
    smooth = np.sin(3 * xx) + np.cos(2 * yy)
    assert patch_grid_ratio(smooth, 8) == pytest.approx(1.0, abs=0.05)  # no grid in a smooth image
    assert patch_grid_ratio(np.full((64, 64), 0.3), 8) == 1.0
    blocks = smooth + 0.5 * np.kron(RNG.random((8, 8)), np.ones((8, 8)))  # steps at every 8th pixel
    assert patch_grid_ratio(blocks, 8) > 3.0
    assert patch_grid_ratio(blocks, 4) > 1.5 and patch_grid_ratio(blocks, 4) < patch_grid_ratio(blocks, 8)
    shifted = np.roll(blocks, 4, axis=(0, 1))  # the same steps, off the 8 px grid the ratio looks at
    assert patch_grid_ratio(shifted, 8) < 1.0
    with pytest.raises(SynthesisError, match="grid ratio"):
        patch_grid_ratio(smooth, 1)
    with pytest.raises(SynthesisError, match="grid ratio"):
        patch_grid_ratio(smooth[:12, :12], 8)


def test_identity_is_a_copy_of_the_input() -> None:
    pa = RNG.random((16, 16)).astype(np.float32)
    out = identity(pa, 45.0, 0.0)
    np.testing.assert_array_equal(out, pa)
    out[0, 0] = 5
    assert pa[0, 0] != 5


def test_foreshortened_at_zero_is_the_input() -> None:
    pa = RNG.random((20, 24)).astype(np.float32)
    np.testing.assert_allclose(foreshortened(pa, 0.0), pa, atol=1e-6)


@pytest.mark.parametrize("azimuth", [60.0, -60.0])
def test_foreshortened_at_60_halves_the_width_about_the_centre(azimuth: float) -> None:
    pa = _block()
    out = foreshortened(pa, azimuth)
    assert _bright_width(pa) == 32
    assert abs(_bright_width(out) - 16) <= 1
    bright = np.flatnonzero(out[0] > 0.5)
    assert bright.min() >= 23 and bright.max() <= 40  # centred on column 31.5
    assert out.max() == pytest.approx(pa.max())
    np.testing.assert_allclose(out[:, :20], 0, atol=1e-12)


def test_foreshortened_at_90_is_a_thin_line_with_the_input_peak() -> None:
    out = foreshortened(_block(), 90.0)
    assert np.count_nonzero(out[0] > 1e-6) <= 4  # 32 columns * 0.05 = 1.6 wide
    assert out.max() == pytest.approx(1.0)
    np.testing.assert_allclose(foreshortened(_block(), -90.0), out)


# --- the evaluation run ----------------------------------------------------------------------------

TARGETS = ((30.0, 0.0), (-30.0, 0.0), (60.0, 0.0), (-90.0, 0.0), (0.0, 10.0))  # the last: a copy of the PA


def _write_dataset(folder: Path, size: int = 48) -> Path:
    """Two cases x two augmentations: a bright blob that moves with azimuth, 16-bit PNGs, index.csv."""
    (folder / "images").mkdir(parents=True)
    yy, xx = np.mgrid[0:size, 0:size] / size
    lines = [",".join(INDEX_COLUMNS)]
    for case_number in range(2):
        case = f"case{case_number}"
        for augmentation in range(2):
            views = ((0.0, 0.0),) + TARGETS
            for view_id, (azimuth, elevation) in enumerate(views):
                centre_x = 0.5 + 0.3 * math.sin(math.radians(azimuth if elevation == 0 else 0.0))
                centre_y = 0.4 + 0.1 * case_number + 0.05 * augmentation
                image = np.exp(-((xx - centre_x) ** 2 + (yy - centre_y) ** 2) / 0.02) + 0.1 * xx
                pixels = (image / image.max() * 65535).astype(np.int32)
                path = f"images/{case}_{augmentation:03d}_{view_id:04d}.png"
                Image.fromarray(pixels, mode="I").convert("I;16").save(folder / path)
                lines.append(f"P{case_number},{case},{augmentation},{view_id},{azimuth},{elevation},{path}")
    (folder / "index.csv").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_dataset(tmp_path_factory.mktemp("drr"))


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("model") / "tiny", resolution=32, vae=False, clip=False)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_evaluate_with_a_model_writes_metrics_summary_and_plot(dataset: Path, model: Path, tmp_path: Path) -> None:
    result = evaluate(model, dataset, tmp_path / "eval", steps=2, guidance=2.0, seed=1, max_batch=3)
    assert result.resolution == 32
    rows = _rows(result.metrics_csv)
    groups = 2 * 2
    assert len(rows) == 3 * groups * len(TARGETS)
    assert {r["method"] for r in rows} == {"model", "identity", "foreshortened"}
    keys = {(r["method"], r["case"], r["augmentation"], r["azimuth"], r["elevation"]) for r in rows}
    assert len(keys) == len(rows)
    assert result.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    copies = [r for r in rows if r["method"] == "identity" and r["elevation"] == "10"]
    assert len(copies) == groups and all(float(r["psnr"]) == math.inf and float(r["ssim"]) == 1.0 for r in copies)
    for r in rows:
        assert math.isfinite(float(r["ssim"])) and float(r["ssim"]) <= 1.0 + 1e-12
        if r["method"] == "model":  # a random model is no copy of anything
            assert math.isfinite(float(r["psnr"]))

    # The summary is the means of metrics.csv, read back.
    scores = read_metrics(result.metrics_csv)
    for method, summary in result.summaries.items():
        mine = [s for s in scores if s.method == method]
        assert summary.overall == MeanScore(len(mine), float(np.mean([s.psnr for s in mine])), summary.overall.ssim)
        assert summary.overall.ssim == pytest.approx(np.mean([s.ssim for s in mine]), abs=1e-15)
        wide = [s for s in mine if abs(s.azimuth) >= 30]
        assert summary.wide.n == len(wide) == 4 * groups
        assert summary.wide.psnr == pytest.approx(np.mean([s.psnr for s in wide]), abs=1e-12)
        assert summary.wide.ssim == pytest.approx(np.mean([s.ssim for s in wide]), abs=1e-15)
        per_azimuth = dict(summary.per_azimuth)
        assert sorted(per_azimuth) == [-90.0, -30.0, 0.0, 30.0, 60.0]
        at_60 = [s for s in mine if s.azimuth == 60.0]
        assert per_azimuth[60.0].psnr == pytest.approx(np.mean([s.psnr for s in at_60]), abs=1e-12)
    assert summarise(scores) == result.summaries
    assert result.summaries["identity"].overall.psnr == math.inf  # the copies make its mean infinite
    assert math.isfinite(result.summaries["identity"].wide.psnr)

    summary_rows = _rows(result.summary_csv)
    wide_model = next(r for r in summary_rows if r["method"] == "model" and r["azimuth"] == "abs>=30")
    assert float(wide_model["psnr"]) == result.summaries["model"].wide.psnr
    assert int(wide_model["n"]) == 4 * groups
    table = format_table(result.summaries)
    assert "abs>=30" in table and "model PSNR" in table and len(table.splitlines()) == 2 + 5 + 3

    # The patch grid of the model's views (tiny model: patch 2 px), beside the truth's.
    grid = json.loads((tmp_path / "eval" / "grid.json").read_text())
    assert grid == result.grid and grid["block"] == 2 and grid["views"] == len(TARGETS) * groups
    assert grid["truth"] == pytest.approx(1.0, abs=0.2) and grid["model"] > 0
    assert "2 px" in format_grid(grid) and format_grid(None) == ""


def test_evaluate_baselines_only_on_a_selection(dataset: Path, tmp_path: Path) -> None:
    result = evaluate(
        None, dataset, tmp_path, lambda row: row.augmentation == 1 and abs(row.azimuth) >= 30, resolution=24
    )
    rows = _rows(result.metrics_csv)
    assert len(rows) == 2 * 2 * 4  # two methods, two cases, four wide targets
    assert {r["augmentation"] for r in rows} == {"1"} and set(result.summaries) == {"identity", "foreshortened"}
    # The blob moves sideways with azimuth, so neither baseline is perfect at 60 degrees.
    assert all(float(r["ssim"]) < 1 for r in rows)


def test_evaluate_refuses_an_empty_selection_or_a_missing_resolution(dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(SynthesisError, match="no target views"):
        evaluate(None, dataset, tmp_path, lambda row: False, resolution=24)
    with pytest.raises(SynthesisError, match="resolution"):
        evaluate(None, dataset, tmp_path)


# --- the command -----------------------------------------------------------------------------------


@pytest.fixture
def main(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """``dicomnode`` with the evaluate command registered (whether or not the lead has yet)."""
    if "evaluate" not in cli.COMMAND_MODULES:
        monkeypatch.setattr(cli, "COMMAND_MODULES", (*cli.COMMAND_MODULES, "evaluate"))
    return cli.main


def test_cli_evaluates_negative_azimuths_and_augmentations(  # type: ignore[no-untyped-def]
    main, dataset: Path, model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "eval"
    argv = ["evaluate", "--data", str(dataset), "--out", str(out), "--model", str(model)]
    argv += ["--azimuths", "-90,-30", "--augmentations", "0", "--cases", "case1", "--steps", "1"]
    assert main(argv) == ExitCode.OK
    rows = _rows(out / "metrics.csv")
    assert len(rows) == 3 * 2
    assert {(r["case"], r["augmentation"], r["azimuth"]) for r in rows} == {
        ("case1", "0", "-90"),
        ("case1", "0", "-30"),
    }
    printed = capsys.readouterr().out
    assert "foreshortened" in printed and "-90" in printed and (out / "metrics.png").is_file()


def test_cli_simple_set_without_a_model(main, dataset: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "eval"
    assert main(["evaluate", "--data", str(dataset), "--out", str(out), "--simple", "--resolution", "16"]) == 0
    rows = _rows(out / "metrics.csv")
    assert len(rows) == 2 * 4 * 4  # the elevated copy of the PA is not in the simple set
    assert {r["elevation"] for r in rows} == {"0"}


def test_cli_exit_codes(main, dataset: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    assert main(["evaluate", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--resolution", "16"]) == (
        ExitCode.NOT_FOUND
    )
    assert main(["evaluate", "--data", str(dataset), "--out", str(tmp_path / "o")]) == ExitCode.USAGE
    missing_model = ["--model", str(tmp_path / "none")]
    assert main(["evaluate", "--data", str(dataset), "--out", str(tmp_path / "o"), *missing_model]) == (
        ExitCode.NOT_FOUND
    )
    nothing = ["--azimuths", "45", "--resolution", "16"]
    assert main(["evaluate", "--data", str(dataset), "--out", str(tmp_path / "o"), *nothing]) == ExitCode.FAILURE
