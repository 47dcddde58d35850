"""``dicomnode synthesize`` on a real CR file with a tiny model: PNGs per view and a contact sheet."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.data import get_testdata_file

from dicomnode.cli import main
from dicomnode.cli.exitcodes import ExitCode


def test_synthesize_writes_views_and_contact_sheet(tmp_path: Path, tiny_pixel_model_dir: Path, capsys) -> None:  # noqa: ANN001
    out = tmp_path / "views"
    argv = ["synthesize", get_testdata_file("RG1_UNCR.dcm"), "--model", str(tiny_pixel_model_dir)]
    argv += ["--azimuths", "-60,30", "--elevations", "0,10", "--steps", "2", "--seed", "3", "--out", str(out)]
    assert main(argv) == ExitCode.OK
    views = sorted(out.glob("view_*.png"))
    assert [p.name for p in views] == ["view_00_az-060_el+00.png", "view_01_az+030_el+10.png"]
    first = np.asarray(Image.open(views[0]))
    assert first.dtype == np.uint8 and max(first.shape) == 64  # long side = model resolution
    sheet = Image.open(out / "contact_sheet.png")
    zoom = -(-192 // first.shape[1])  # tiles narrower than 192 px are enlarged for display
    assert sheet.width == 3 * first.shape[1] * zoom  # input + 2 views in one row
    assert "2 synthetic views" in capsys.readouterr().out


def test_synthesize_reports_a_missing_model(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    argv = ["synthesize", get_testdata_file("RG1_UNCR.dcm"), "--model", str(tmp_path / "none"), "--out", str(tmp_path)]
    assert main(argv) == ExitCode.FAILURE
    assert "does not exist" in capsys.readouterr().err


def test_synthesize_refuses_a_colour_image(tmp_path: Path, tiny_pixel_model_dir: Path, capsys) -> None:  # noqa: ANN001
    argv = ["synthesize", get_testdata_file("SC_rgb.dcm"), "--model", str(tiny_pixel_model_dir), "--out", str(tmp_path)]
    assert main(argv) == ExitCode.FAILURE
    err = capsys.readouterr().err.lower()
    assert "colour" in err or "color" in err, err
