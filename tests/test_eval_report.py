"""Selection summaries, angle plots, targets and the full evaluation run (library and command)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from dicomnode import cli
from dicomnode.cli.evaluate import CHECK_SELECTIONS
from dicomnode.cli.exitcodes import ExitCode
from dicomnode.errors import SynthesisError
from synthesis.eval_report import (
    STATIC_SELECTIONS,
    format_selections,
    plot_angles,
    read_selections,
    selections_for,
    summarise_selections,
    write_selections,
)
from synthesis.eval_suite import REFERENCE, format_targets, judge, run_evaluation
from synthesis.evaluate import MeanScore, Score, read_metrics
from synthesis.input_checks import read_checks
from tests.lattice_dataset import AZIMUTHS, ELEVATIONS, write_lattice_dataset
from tests.tiny_model import make_tiny_model

PNG = b"\x89PNG\r\n\x1a\n"


def _scores() -> list[Score]:
    """model = 20 + |azimuth| / 10 dB + elevation / 100, identity 10 dB everywhere; one case."""
    scores = []
    for elevation in (-30.0, -15.0, 0.0, 15.0, 30.0):
        for azimuth in (-90.0, -45.0, -30.0, -15.0, 15.0, 45.0, 60.0):
            model = 20 + abs(azimuth) / 10 + elevation / 100
            scores.append(Score("model", "c", 0, azimuth, elevation, model, model / 40))
            scores.append(Score("identity", "c", 0, azimuth, elevation, 10.0, 0.25))
    return scores


def test_selections_pick_the_views_they_name() -> None:
    scores = _scores()
    selections = selections_for(scores)
    names = [s.name for s in selections]
    assert names == ["all", "wide-el0", "az45-tilted", "az45-el-30", "az45-el-15", "az45-el+15", "az45-el+30"]
    summary = summarise_selections(scores, selections)
    assert summary["all"]["model"].n == 35 and summary["all"]["identity"].n == 35
    # |azimuth| >= 30 at elevation 0: -90, -45, -30, 45, 60 (not +-15, not the tilted rows).
    wide = [20 + a / 10 for a in (90, 45, 30, 45, 60)]
    assert summary["wide-el0"]["model"] == MeanScore(5, pytest.approx(np.mean(wide)), pytest.approx(np.mean(wide) / 40))
    assert summary["az45-tilted"]["model"].n == 8  # +-45 at four non-zero elevations
    assert summary["az45-el+15"]["model"].n == 2
    assert summary["az45-el+15"]["model"].psnr == pytest.approx(24.5 + 0.15)
    assert summary["az45-el-30"]["model"].psnr == pytest.approx(24.5 - 0.3)
    assert summary["az45-el-30"]["identity"] == MeanScore(2, 10.0, 0.25)


def test_selections_round_trip_and_format(tmp_path: Path) -> None:
    summary = summarise_selections(_scores())
    path = write_selections(summary, tmp_path / "selections.csv")
    assert read_selections(path) == summary
    table = format_selections(summary).splitlines()
    assert len(table) == 2 + 7
    wide = summary["wide-el0"]["model"]
    assert table[3].split()[:4] == ["wide-el0", "5", f"{wide.psnr:.2f}", f"{wide.ssim:.3f}"]
    assert (wide.psnr, wide.ssim) == (pytest.approx(25.4), pytest.approx(25.4 / 40))
    (tmp_path / "bad.csv").write_text("a,b\n")
    with pytest.raises(SynthesisError, match="header"):
        read_selections(tmp_path / "bad.csv")


def test_only_elevation_zero_gives_no_elevation_selections_and_an_annotated_plot(tmp_path: Path) -> None:
    flat = [s for s in _scores() if s.elevation == 0]
    assert [s.name for s in selections_for(flat)] == list(STATIC_SELECTIONS)
    assert summarise_selections(flat)["az45-tilted"]["model"].n == 0
    assert plot_angles(flat, tmp_path / "angles.png").read_bytes()[:8] == PNG


def test_judge_compares_model_with_identity_per_selection() -> None:
    summary = summarise_selections(_scores())
    targets = judge(summary)
    names = [t.name for t in targets]
    assert len(targets) == 2 * 5 and names[0] == f"wide-el0 PSNR: model > {REFERENCE}"
    assert all(t.passed for t in targets)
    # Identity better at elevation -30 (SSIM only): that target, and only it, fails.
    summary["az45-el-30"]["identity"] = MeanScore(2, 10.0, 0.99)
    failed = [t.name for t in judge(summary) if not t.passed]
    assert failed == [f"az45-el-30 SSIM: model > {REFERENCE}"]
    assert "FAIL  az45-el-30 SSIM" in format_targets(judge(summary))
    baselines_only = {k: {m: v for m, v in per.items() if m != "model"} for k, per in summary.items()}
    assert judge(baselines_only) == [] and "none" in format_targets([])


# --- the full run, with a tiny random model --------------------------------------------------------


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_lattice_dataset(tmp_path_factory.mktemp("lattice"), size=32)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("model") / "tiny", resolution=32, vae=False, clip=False)


def test_run_evaluation_with_input_checks_on_held_out_cases(dataset: Path, model: Path, tmp_path: Path) -> None:
    held_out = {"c1", "c2"}
    report = run_evaluation(
        model, dataset, tmp_path, lambda row: row.case in held_out,
        input_checks=STATIC_SELECTIONS["wide-el0"], steps=1, guidance=2.0, seed=5, max_batch=4,
    )  # fmt: skip
    views = len(AZIMUTHS) * len(ELEVATIONS)
    assert report.evaluation.summaries["model"].overall.n == 2 * views
    assert report.selections_csv.is_file() and report.angles_plot.read_bytes()[:8] == PNG
    assert read_selections(report.selections_csv) == report.selections
    assert report.selections["az45-el+15"]["model"].n == 2 * 2

    checks = report.checks
    assert checks is not None and checks.grey.n == 2 * 5 and checks.flip.n == 2 * 4
    assert {v.case for v in checks.views} == held_out
    assert all(abs(v.azimuth) >= 30 and v.elevation == 0 for v in checks.views)
    # The checks' model-from-PA scores are the evaluation's own: same model, seed and views (batched
    # differently, so equal to float rounding only).
    model_scores = {
        (s.case, s.azimuth, s.elevation): (s.psnr, s.ssim) for s in read_metrics(report.evaluation.metrics_csv)
        if s.method == "model"
    }  # fmt: skip
    for v in read_checks(checks.csv_path):
        assert (v.psnr_pa, v.ssim_pa) == pytest.approx(model_scores[(v.case, v.azimuth, v.elevation)], abs=1e-5)
    document = json.loads(checks.json_path.read_text())
    assert document["settings"]["seed"] == 5 and document["settings"]["selection"] == "wide-el0"
    assert document["settings"]["model_identity"] and document["inputs"] == 2

    targets = json.loads(report.targets_json.read_text())
    assert [t["name"] for t in targets["targets"]] == [t.name for t in report.targets]
    assert len(report.targets) == 2 * 3 + 2  # wide-el0, el -15, el +15; grey and flip
    assert targets["passed"] == report.passed == all(t.passed for t in report.targets)


def test_run_evaluation_refuses_checks_without_a_model(dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(SynthesisError, match="need a model"):
        run_evaluation(None, dataset, tmp_path, input_checks=STATIC_SELECTIONS["all"], resolution=32)
    report = run_evaluation(None, dataset, tmp_path, resolution=32)
    assert report.checks is None and report.targets == () and not report.passed
    assert json.loads(report.targets_json.read_text()) == {"passed": False, "targets": []}


# --- the command -----------------------------------------------------------------------------------


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_cli_check_choices_are_the_static_selections() -> None:
    assert set(CHECK_SELECTIONS) == set(STATIC_SELECTIONS) and CHECK_SELECTIONS[0] == "wide-el0"


def test_cli_input_checks_and_elevations(
    dataset: Path, model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "eval"
    argv = ["evaluate", "--data", str(dataset), "--out", str(out), "--model", str(model), "--cases", "c2"]
    argv += ["--elevations", "-15,0", "--steps", "1", "--input-checks"]
    assert cli.main(argv) == ExitCode.OK
    rows = _rows(out / "metrics.csv")
    assert {r["elevation"] for r in rows} == {"-15", "0"} and {r["case"] for r in rows} == {"c2"}
    assert len(rows) == 3 * len(AZIMUTHS) * 2
    checks = _rows(out / "input_checks.csv")
    assert len(checks) == 5 and {r["elevation"] for r in checks} == {"0"}
    printed = capsys.readouterr().out
    for needed in ("wide-el0", "az45-el-15", "input checks (5 views)", "grey input", "flipped PA", "angles.png"):
        assert needed in printed, needed
    assert printed.count("PASS") + printed.count("FAIL") >= 2 * 2 + 2 * 2  # verdicts in checks and targets
    assert "az45-el+15" not in printed  # filtered out


def test_cli_input_checks_need_a_model(dataset: Path, tmp_path: Path) -> None:
    argv = ["evaluate", "--data", str(dataset), "--out", str(tmp_path), "--resolution", "32", "--input-checks"]
    assert cli.main(argv) == ExitCode.USAGE


def test_cli_takes_the_models_recommended_sampler(
    dataset: Path, model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recommending = tmp_path / "model"
    shutil.copytree(model, recommending)
    meta = {"format": 1, "recommended": {"steps": 1, "guidance_scale": 1.25}}
    (recommending / "dicomnode-model.json").write_text(json.dumps(meta), encoding="utf-8")
    base = ["evaluate", "--data", str(dataset), "--model", str(recommending), "--cases", "c2", "--input-checks"]
    assert cli.main([*base, "--out", str(tmp_path / "recommended")]) == ExitCode.OK
    settings = json.loads((tmp_path / "recommended" / "input_checks.json").read_text())["settings"]
    assert (settings["steps"], settings["guidance"]) == (1, 1.25)
    assert settings["flip_seed"] == settings["seed"] + 1  # the flipped PA's own noise
    printed = capsys.readouterr().out
    assert "sampler: 1 steps (recommended by" in printed and "guidance 1.25 (recommended by" in printed, printed

    assert cli.main([*base, "--out", str(tmp_path / "given"), "--steps", "2"]) == ExitCode.OK
    settings = json.loads((tmp_path / "given" / "input_checks.json").read_text())["settings"]
    assert (settings["steps"], settings["guidance"]) == (2, 1.25)
    printed = capsys.readouterr().out
    assert "sampler: 2 steps (given), guidance 1.25 (recommended by" in printed, printed

    (recommending / "dicomnode-model.json").write_text('{"recommended": {"steps": 0}}', encoding="utf-8")
    assert cli.main([*base, "--out", str(tmp_path / "bad")]) == ExitCode.FAILURE
    assert "recommended.steps" in capsys.readouterr().err
