"""``[engine] model``: the packaged demo model by name from a configuration anywhere; folders that
do not exist are configuration errors; ``dicomnode synthesize`` follows the model's metadata."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from dicomnode.cli import main
from dicomnode.cli.exitcodes import ExitCode
from dicomnode.config import load_settings
from dicomnode.model_location import packaged_model_folder

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "models" / "demo"

SITE = """
[node]
storage_dir = "var"

[engine]
model = "{model}"
"""


def site(folder: Path, model: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "site.toml"
    path.write_text(SITE.format(model=model), encoding="utf-8")
    return path


def test_demo_names_the_packaged_model_from_a_config_anywhere(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = site(tmp_path / "elsewhere" / "etc", "demo")  # a copied configuration, outside the checkout
    settings = load_settings(config, env={})
    assert settings.engine.model == DEMO == packaged_model_folder("demo")
    assert (settings.engine.model / "model_index.json").is_file()
    assert main(["config", "check", "--config", str(config)]) == ExitCode.OK
    assert f"model: {DEMO} (found)" in capsys.readouterr().out
    # The environment and flags may name it too.
    assert load_settings(config, env={"DICOMNODE_ENGINE__MODEL": "demo"}).engine.model == DEMO


def test_a_folder_called_demo_next_to_the_config_wins(tmp_path: Path) -> None:
    (tmp_path / "demo").mkdir()
    assert load_settings(site(tmp_path, "demo"), env={}).engine.model == tmp_path / "demo"


@pytest.mark.parametrize("model", ["models/demo", "../no-such-model", "/nonexistent/svdrr-512", "dmeo"])
def test_a_model_folder_that_does_not_exist_is_a_config_error(
    tmp_path: Path, model: str, capsys: pytest.CaptureFixture
) -> None:
    config = site(tmp_path / "site", model)
    assert main(["config", "check", "--config", str(config)]) == ExitCode.CONFIG
    err = capsys.readouterr().err
    assert "engine.model: model folder" in err and "does not exist" in err and str(config) in err, err
    assert str((config.parent / model).resolve()) in err
    # serve refuses to start on it too, before opening any port (edges run no synthesis: they start).
    assert main(["serve", "--config", str(config)]) == ExitCode.CONFIG
    assert "engine.model: model folder" in capsys.readouterr().err


def tiny_with_meta(tmp_path: Path, tiny: Path, **recommended: float) -> Path:
    model = tmp_path / "model"
    shutil.copytree(tiny, model)
    meta = {"format": 1, "recommended": recommended, "gate": {"method": "denoise", "threshold": 0.0}}
    (model / "dicomnode-model.json").write_text(json.dumps(meta), encoding="utf-8")
    return model


def synthesize(model: Path, out: Path, *extra: str) -> int:
    argv = ["synthesize", get_testdata_file("RG1_UNCR.dcm"), "--model", str(model), "--azimuths", "30"]
    return main([*argv, "--seed", "1", "--out", str(out), *extra])


def test_synthesize_uses_the_models_recommended_steps_and_guidance(
    tmp_path: Path, tiny_pixel_model_dir: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from synthesis.pipeline import SvdrrPipeline

    calls: list[tuple[int, float]] = []
    real_call = SvdrrPipeline.__call__

    def recording(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202 - the real pipeline runs
        calls.append((kwargs["num_inference_steps"], kwargs["guidance_scale"]))
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(SvdrrPipeline, "__call__", recording)
    model = tiny_with_meta(tmp_path, tiny_pixel_model_dir, steps=2, guidance_scale=1.5)
    assert synthesize(model, tmp_path / "default") == ExitCode.OK
    out = capsys.readouterr().out
    assert "steps 2 (recommended by" in out and "guidance 1.5 (recommended by" in out, out
    assert synthesize(model, tmp_path / "given", "--steps", "3", "--guidance", "3") == ExitCode.OK
    assert "steps 3 (given), guidance 3 (given)" in capsys.readouterr().out
    (model / "dicomnode-model.json").unlink()  # no metadata: the SV-DRR defaults, and it says so
    assert synthesize(model, tmp_path / "bare", "--steps", "2") == ExitCode.OK
    assert "guidance 3 (SV-DRR default" in capsys.readouterr().out
    assert calls == [(2, 1.5), (3, 3.0), (2, 3.0)]
    assert len(list((tmp_path / "default").glob("view_*.png"))) == 1


def test_synthesize_refuses_elevations_the_model_never_learned(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "views"
    argv = ["synthesize", str(DEMO / "sample" / "chest_pa_drr_phantom.dcm"), "--model", "demo"]
    assert main([*argv, "--azimuths", "-30,30", "--elevations", "0,45", "--out", str(out)]) == ExitCode.USAGE
    err = capsys.readouterr().err
    assert "elevation 45 requested" in err and "trained at elevations -30..30 degrees" in err, err
    assert str(DEMO / "dicomnode-model.json") in err
    assert not out.exists()  # nothing written, no view labelled with an elevation it never learned


def test_config_check_says_which_rule_elevations_the_model_never_learned(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    text = SITE.format(model="demo") + '\n[[rules]]\nname = "tilt"\nazimuths = [-30, 30]\nelevations = [0, 40]\n'
    (tmp_path / "site.toml").write_text(text, encoding="utf-8")
    assert main(["config", "check", "--config", str(tmp_path / "site.toml")]) == ExitCode.OK
    out = capsys.readouterr().out
    assert "tilt: 2 views [-30, 30/40]" in out
    assert "elevation 40 is outside the model's trained range -30..30: jobs refused" in out, out
