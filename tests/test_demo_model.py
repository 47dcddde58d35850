"""The shipped demo model and sample input: they load, they are what the card says, the tour works.

Reproducing the card's evaluation numbers takes minutes (DRR rendering), so that is
``benchmarks/demo_model.py``, not a test.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest

from synthesis import SvdrrPipeline
from synthesis.radiograph import prepare_radiograph
from tests.conftest import free_port
from tests.peers import NodeProcess, Orthanc, run_cli, storescu, wait_for

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "models" / "demo"
SAMPLE = DEMO / "sample" / "chest_pa_drr_phantom.dcm"
SELECTION = "held-out-patients"  # benchmarks/demo_model.py: every view of the held-out generated patients
VALIDATION = "validation-patients"  # the patients the sampler settings were chosen on


@pytest.fixture(scope="module")
def demo() -> SvdrrPipeline:
    pipe = SvdrrPipeline.from_pretrained(DEMO)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_demo_model_is_what_its_card_says(demo: SvdrrPipeline) -> None:
    recipe = json.loads((DEMO / "recipe.json").read_text())
    assert demo.model_identity == recipe["model_identity"]
    assert demo.vae is None and demo.image_encoder is None and demo.resolution == recipe["resolution"]
    weights = sum(p.stat().st_size for p in DEMO.rglob("*.safetensors"))
    assert weights < 25 * 2**20, f"{weights} bytes of weights"
    card = (DEMO / "MODEL_CARD.md").read_text()
    for needed in ("LIDC-IDRI-0001", "CC BY 3.0", "not for diagnosis", demo.model_identity[:16]):
        assert needed.lower() in card.lower(), needed
    # The card's table is the stored summary, number for number.
    with (DEMO / "evaluation" / SELECTION / "summary.csv").open() as f:
        rows = {(r["method"], r["azimuth"]): r for r in csv.DictReader(f)}
    for method in ("model", "identity", "foreshortened"):
        row = rows[(method, "abs>=30")]
        line = re.search(rf"\| {SELECTION} \| {method} \| ([\d.]+) \| ([\d.]+) \|", card)
        assert line, f"{SELECTION}/{method} missing from the card"
        assert float(line.group(1)) == pytest.approx(float(row["psnr"]), abs=0.01)
        assert float(line.group(2)) == pytest.approx(float(row["ssim"]), abs=0.001)


def test_demo_model_targets_on_held_out_patients() -> None:
    """The issue's targets, read from the stored evaluations of the held-out and validation patients."""
    recipe = json.loads((DEMO / "recipe.json").read_text())
    assert len(recipe["hold_out_cases"]) == 8 and len(recipe["validation_cases"]) == 8
    assert not set(recipe["hold_out_cases"]) & set(recipe["validation_cases"])
    card = (DEMO / "MODEL_CARD.md").read_text()
    for selection in (VALIDATION, SELECTION):
        targets = json.loads((DEMO / "evaluation" / selection / "targets.json").read_text())
        names = {t["name"] for t in targets["targets"]}
        for needed in ("wide-el0 SSIM", "az45-el-30 PSNR", "az45-el+15 SSIM", "grey input", "flipped PA (abs azimuth"):
            assert any(needed in n for n in names), (selection, needed)
        failed = [t["name"] for t in targets["targets"] if not t["passed"]]
        assert failed == [], (selection, failed)  # every target, the input-use checks included
        assert f"| {selection} | flipped PA, abs(azimuth) <= 60 |" in card, selection
    assert "**fail**" not in card
    folder = DEMO / "evaluation" / SELECTION
    with (folder / "summary.csv").open() as f:
        rows = {(r["method"], r["azimuth"]): r for r in csv.DictReader(f)}
    model, identity = rows[("model", "abs>=30")], rows[("identity", "abs>=30")]
    assert float(model["psnr"]) > float(identity["psnr"]) and float(model["ssim"]) > float(identity["ssim"])
    checks = json.loads((folder / "input_checks.json").read_text())
    assert checks["grey"]["passed"] and checks["settings"]["flip_seed"] == checks["settings"]["seed"] + 1
    recommended = json.loads((DEMO / "dicomnode-model.json").read_text())["recommended"]
    assert (checks["settings"]["steps"], checks["settings"]["guidance"]) == (
        recommended["steps"],
        recommended["guidance_scale"],
    )


def test_sample_input_synthesises(demo: SvdrrPipeline) -> None:
    prepared = prepare_radiograph(pydicom.dcmread(SAMPLE), demo.resolution)
    out = demo(prepared.image, azimuths=[-90, 90], num_inference_steps=4, generator=0)
    assert out.images.shape == (2, demo.resolution, demo.resolution) and np.isfinite(out.images).all()
    assert np.abs(out.images[0] - out.images[1]).mean() > 0.01  # left and right laterals differ


@pytest.mark.slow
def test_readme_tour_with_the_shipped_configuration(tmp_path: Path) -> None:
    """The shipped config (only ports and folders moved into the test) + the demo model + sample."""
    orthanc = Orthanc(tmp_path / "orthanc").start()
    port = free_port()
    text = (ROOT / "config" / "dicomnode.toml").read_text()
    text = text.replace("port = 11112", f"port = {port}").replace("port = 4242", f"port = {orthanc.dicom_port}")
    text = text.replace('storage_dir = "../var"', f'storage_dir = "{tmp_path / "var"}"')
    assert 'model = "demo"' in text  # the packaged demo model, found from this copy outside the checkout too
    text = text.replace("settle_s = 5.0", "settle_s = 0.5")
    config = tmp_path / "dicomnode.toml"
    config.write_text(text)
    node = NodeProcess(config, port, tmp_path / "node.log").start()
    try:
        assert storescu(port, [SAMPLE]).returncode == 0

        def synthetic_series() -> dict | None:
            for series_id in orthanc.get("/series"):
                series = orthanc.get(f"/series/{series_id}")
                if series["MainDicomTags"].get("SeriesNumber") == "901" and len(series["Instances"]) == 6:
                    return series
            return None

        series = wait_for(synthetic_series, 180, "the demo model's six views in Orthanc", interval_s=0.5)
        assert "SYNTHETIC" in series["MainDicomTags"]["SeriesDescription"]
        chain = run_cli("provenance", pydicom.dcmread(SAMPLE).SOPInstanceUID, "--config", str(config))
        assert chain.returncode == 0 and chain.stdout.count("-> pacs") == 6, chain.stdout
    finally:
        node.stop()
        orthanc.stop()
