"""The README tour's sample input: a DRR wrapped as DX For Presentation, written, dciodvfy-checked, read back.

Built from a small synthetic image (no CT rendering here); the shipped file
``models/demo/sample/chest_pa_drr_phantom.dcm`` is checked as well, including that the shipped
configuration routes it to synthesis.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicomnode.cli import main
from dicomnode.cli.exitcodes import ExitCode
from dicomnode.config import load_settings
from dicomnode.errors import SynthesisError
from dicomnode.rules import facts_from_dataset, loop_reason, matching_rules
from synthesis.radiograph import display_pixels, prepare_radiograph
from synthesis.sample_dx import DX_FOR_PRESENTATION, dx_from_drr, sample_uid, write_dx

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "models" / "demo" / "sample" / "chest_pa_drr_phantom.dcm"


def dciodvfy_errors(path: Path) -> tuple[list[str], str]:
    """The lines dciodvfy starts with "Error" for ``path``, and its whole output for the message."""
    tool = "/usr/bin/dciodvfy" if Path("/usr/bin/dciodvfy").exists() else shutil.which("dciodvfy")
    if not tool:
        pytest.fail("dciodvfy is not installed (apt-get install dicom3tools)")
    run = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
    output = run.stdout + run.stderr
    return [line for line in output.splitlines() if line.startswith("Error")], output


def synthetic_drr(rows: int = 96, columns: int = 80) -> np.ndarray:
    """A [0, 1] float image with a bright left-right asymmetric blob, so flips would show."""
    y, x = np.mgrid[0:rows, 0:columns].astype(np.float64)
    image = np.exp(-(((x - 0.7 * columns) / 12) ** 2 + ((y - 0.4 * rows) / 20) ** 2))
    return (image - image.min()) / (image.max() - image.min())


@pytest.fixture
def written(tmp_path: Path) -> tuple[Path, np.ndarray]:
    image = synthetic_drr()
    ds = dx_from_drr(image, 1.4, sdd_mm=1800.0, source_to_centre_mm=1650.0)
    return write_dx(ds, tmp_path / "sample.dcm"), image


def test_written_dx_passes_dciodvfy(written: tuple[Path, np.ndarray]) -> None:
    path, _ = written
    errors, output = dciodvfy_errors(path)
    assert errors == [], output
    assert "DXImageForPresentation" in output, output


def test_read_back_attributes(written: tuple[Path, np.ndarray]) -> None:
    path, _ = written
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.SOPClassUID == DX_FOR_PRESENTATION == ds.file_meta.MediaStorageSOPClassUID
    assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
    assert (ds.Modality, ds.BodyPartExamined, ds.ViewPosition) == ("DX", "CHEST", "PA")
    assert ds.PresentationIntentType == "FOR PRESENTATION"
    assert list(ds.ImageType) == ["DERIVED", "PRIMARY"]
    assert list(ds.PatientOrientation) == ["L", "F"]
    assert ds.ViewCodeSequence[0].CodeValue == "399348003"
    assert ds.AnatomicRegionSequence[0].CodeValue == "43799004"
    assert str(ds.PatientName) == "DEMO^PHANTOM"
    assert (ds.PatientID, ds.PatientSex, ds.PatientBirthDate) == ("DEMO-LIDC-0001", "O", "")
    assert ds.AccessionNumber == "DEMO0001"
    assert ds.StudyDescription == "DEMO chest PA (DRR of public CT)"
    assert "not a patient radiograph" in ds.ImageComments.lower()
    assert "LIDC-IDRI-0001" in ds.ImageComments and "CC BY 3.0" in ds.ImageComments
    assert [float(v) for v in ds.ImagerPixelSpacing] == [1.4, 1.4] == [float(v) for v in ds.PixelSpacing]
    assert float(ds.EstimatedRadiographicMagnificationFactor) == pytest.approx(1800 / 1650, rel=1e-4)
    assert "SyntheticData" not in ds  # a projection of acquired data, and YES would stop processing


def test_pixels_round_trip_at_12_bits(written: tuple[Path, np.ndarray]) -> None:
    path, image = written
    ds = pydicom.dcmread(path)
    assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PhotometricInterpretation) == (16, 12, 11, "MONOCHROME2")
    stored = ds.pixel_array
    assert stored.shape == image.shape and stored.max() == 4095 and stored.min() == 0
    np.testing.assert_array_equal(stored, np.rint(image * 4095).astype(np.uint16))
    # The full-range window shows the image as the model saw its training data: no clipping, no flip.
    np.testing.assert_allclose(display_pixels(ds), image, atol=1.0 / 4095)


def test_uids_are_deterministic_and_seeded() -> None:
    image = synthetic_drr()
    first, again = dx_from_drr(image, 1.4), dx_from_drr(image, 1.4)
    other = dx_from_drr(image, 1.4, seed_uid_text="another-demo")
    keys = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
    assert [first[k].value for k in keys] == [again[k].value for k in keys]
    assert len({first[k].value for k in keys}) == 3
    assert not {first[k].value for k in keys} & {other[k].value for k in keys}
    assert first.SOPInstanceUID == sample_uid("dicomnode-demo-LIDC-IDRI-0001", "instance")
    assert first.SOPInstanceUID.startswith("2.25.") and len(first.SOPInstanceUID) <= 64


def test_uint16_input_is_scaled_to_12_bits() -> None:
    image = np.array([[0, 65535], [32768, 16]] * 40, dtype=np.uint16)
    stored = np.frombuffer(dx_from_drr(image, 0.7).PixelData, dtype=np.uint16).reshape(image.shape)
    assert stored[:2].tolist() == [[0, 4095], [2048, 1]]


@pytest.mark.parametrize(
    ("image", "spacing"),
    [
        (np.full((8, 8), 1.5), 1.0),
        (np.full((8, 8), np.nan), 1.0),
        (np.zeros((2, 8, 8)), 1.0),
        (np.zeros((8, 8), dtype=np.int32), 1.0),
        (np.zeros((8, 8)), 0.0),
    ],
)
def test_refuses_bad_input(image: np.ndarray, spacing: float) -> None:
    with pytest.raises(SynthesisError):
        dx_from_drr(image, spacing)


def test_cli_refuses_too_small_size(tmp_path: Path) -> None:
    out = tmp_path / "x.dcm"
    assert main(["drr", "sample-dx", "--out", str(out), "--size", "10"]) == ExitCode.USAGE
    assert not out.exists()


@pytest.mark.skipif(not SHIPPED.exists(), reason="shipped sample not generated yet")
def test_shipped_sample_is_valid_and_routed() -> None:
    errors, output = dciodvfy_errors(SHIPPED)
    assert errors == [], output
    ds = pydicom.dcmread(SHIPPED)
    assert ds.SOPClassUID == DX_FOR_PRESENTATION
    assert str(ds.PatientName) == "DEMO^PHANTOM" and ds.PatientID == "DEMO-LIDC-0001"
    assert ds.SOPInstanceUID == sample_uid("dicomnode-demo-LIDC-IDRI-0001", "instance")
    prepared = prepare_radiograph(ds, 64)
    assert prepared.image.shape == (64, 64) and 0.0 <= prepared.image.min() < prepared.image.max() <= 1.0

    settings = load_settings(ROOT / "config" / "dicomnode.toml", env={})
    facts = facts_from_dataset(ds)
    assert [rule.name for rule in matching_rules(settings.rules, facts)] == ["chest-radiograph"]
    assert loop_reason(facts, settings, (), settings.output.manufacturer) is None
