"""benchmarks/demo_model.py on a recipe of generated patients: record, reproduce, catch a changed number.

A tiny random model stands in for the demo model and a tiny lattice dataset for the rendered one
(``--data``), so this runs in seconds; the real reproduction is the benchmark itself.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.lattice_dataset import write_lattice_dataset
from tests.tiny_model import make_tiny_model

ROOT = Path(__file__).resolve().parents[1]
RECIPE = {
    "data": {"command": "dicomnode drr render --example-ct --out DATA --size 32 --augmentations 0"},
    "hold_out_cases": ["c2"],
    "evaluation": {"steps": 1, "guidance": 2.0, "seed": 4, "max_batch": 8},
}


@pytest.fixture(scope="module")
def demo_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("demo_model_benchmark", ROOT / "benchmarks" / "demo_model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_render_argv_substitutes_the_dataset_folder(demo_bench: ModuleType, tmp_path: Path) -> None:
    argv = demo_bench.render_argv(RECIPE["data"]["command"], tmp_path / "d")
    assert argv[:2] == ["drr", "render"] and argv[argv.index("--out") + 1] == str(tmp_path / "d")
    with pytest.raises(SystemExit, match="not a 'dicomnode drr render"):
        demo_bench.render_argv("dicomnode train --data DATA", tmp_path)


def test_validation_patients_are_a_selection_and_are_rendered(demo_bench: ModuleType, tmp_path: Path) -> None:
    recipe = {
        "data": {"command": "dicomnode drr render --example-ct --out DATA --patients 64 --seed 11"},
        "hold_out_cases": ["GP056", "GP057"],
        "validation_cases": ["GP064", "GP065"],
    }
    found = demo_bench.selections(recipe)
    assert list(found) == ["held-out-patients", "validation-patients"]
    row = demo_bench.IndexRow("P", "GP064", 0, 1, 30.0, 0.0, "x.png")
    assert found["validation-patients"](row) and not found["held-out-patients"](row)
    argv = demo_bench.evaluated_render_argv(recipe, tmp_path / "d")
    assert argv[argv.index("--patients") + 1] == "66" and argv[argv.index("--first-patient") + 1] == "56"
    assert argv[argv.index("--out") + 1] == str(tmp_path / "d")
    del recipe["validation_cases"]
    argv = demo_bench.evaluated_render_argv(recipe, tmp_path / "d")
    assert argv[argv.index("--patients") + 1] == "64" and argv[argv.index("--first-patient") + 1] == "56"


def test_record_then_reproduce_then_catch_a_change(
    demo_bench: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = make_tiny_model(tmp_path / "model", resolution=32, vae=False, clip=False)
    (model / "recipe.json").write_text(json.dumps(RECIPE))
    data = write_lattice_dataset(tmp_path / "data", size=32)
    assert list(demo_bench.selections(RECIPE)) == ["held-out-patients"]

    assert demo_bench.main(["--model", str(model), "--data", str(data), "--record"]) == 0
    stored = model / "evaluation" / "held-out-patients"
    for name in ("summary.csv", "selections.csv", "input_checks.json", "input_checks.csv", "angles.png"):
        assert (stored / name).is_file(), name
    checks = json.loads((stored / "input_checks.json").read_text())
    assert checks["settings"]["selection"] == "wide-el0" and checks["grey"]["n"] == 5
    printed = capsys.readouterr().out
    assert "| held-out-patients | wide-el0 | model |" in printed and "| held-out-patients | grey input |" in printed
    figures = demo_bench.stored_figures(stored)
    assert ("input_checks.json", "flip", "passed") in figures
    assert ("selections.csv", "az45-el+15", "identity", "ssim") in figures

    assert demo_bench.main(["--model", str(model), "--data", str(data), "--out", str(tmp_path / "again")]) == 0
    assert "was reproduced" in capsys.readouterr().out

    with (stored / "selections.csv").open() as f:
        rows = list(csv.reader(f))
    target = next(i for i, r in enumerate(rows) if r[:2] == ["az45-el-15", "model"])
    rows[target][3] = repr(float(rows[target][3]) + 0.01)
    with (stored / "selections.csv").open("w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)
    assert demo_bench.main(["--model", str(model), "--data", str(data), "--out", str(tmp_path / "third")]) == 1
    assert "selections.csv/az45-el-15/model/psnr" in capsys.readouterr().out
