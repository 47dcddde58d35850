"""Radiographs into the engine and views back out: synthetic datasets for exact LUT arithmetic, real
files from pydicom-data (CR, every compressed transfer syntax) and dcmtk as an independent reference
for transcoding, decoding and display rendering."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import MPEG2MPML, UID, ExplicitVRLittleEndian, generate_uid

from dicomnode.errors import SynthesisError
from synthesis.radiograph import (
    Placement,
    PreparedRadiograph,
    RestoredViews,
    display_pixels,
    prepare_radiograph,
    restore_views,
)
from tests.conftest import dcmtk

CR = "1.2.840.10008.5.1.4.1.1.1"
R = 128


def _testdata(name: str) -> str:
    path = get_testdata_file(name)
    assert path is not None, f"pydicom-data lacks {name}"
    return str(path)


def _read(name: str) -> Dataset:
    return pydicom.dcmread(_testdata(name))


def _make_ds(pixels: np.ndarray, photometric: str = "MONOCHROME2", bits_stored: int = 12, **attrs) -> Dataset:
    """A minimal in-memory CR with native pixel data."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CR
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "CR"
    ds.set_pixel_data(pixels, photometric, bits_stored)
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    return ds


def _phantom(rows: int = 64, columns: int = 64) -> np.ndarray:
    """12-bit 'body': a dim gradient background with a bright disc (bone)."""
    y, x = np.mgrid[0:rows, 0:columns]
    image = 400 + 6 * x + 3 * y
    disc = (y - rows / 2) ** 2 + (x - columns / 2) ** 2 < (min(rows, columns) / 4) ** 2
    image[disc] = 3500
    return image.astype(np.uint16)


def _transcode(tool: str, args: list[str], source: str, target: Path) -> Dataset:
    subprocess.run([dcmtk(tool), *args, source, str(target)], check=True, capture_output=True, timeout=60)
    return pydicom.dcmread(target)


def _dcmtk_display(source: str, voi_args: list[str], target: Path) -> np.ndarray:
    """dcmtk's rendering of a dataset as a 16-bit PNG, scaled to [0, 1]."""
    command = [dcmtk("dcm2pnm"), "+on2", *voi_args, source, str(target)]
    subprocess.run(command, check=True, capture_output=True, timeout=60)
    return np.asarray(Image.open(target)).astype(np.float64) / 65535


# --- grayscale rendering: photometric, VOI, modality LUT, percentiles -------------------------------


@pytest.mark.parametrize("window", [None, (2000.0, 2500.0)])
def test_monochrome1_prepares_like_the_equivalent_monochrome2(window: tuple[float, float] | None) -> None:
    stored = _phantom()
    m2 = _make_ds(stored, "MONOCHROME2")
    m1 = _make_ds((4095 - stored).astype(np.uint16), "MONOCHROME1")
    if window is not None:
        center, width = window
        m2.WindowCenter, m2.WindowWidth = center, width
        # LINEAR (PS3.3 C.11.2.1.2.1) mirrored about the 12-bit range: center c -> 4096 - c.
        m1.WindowCenter, m1.WindowWidth = 4096 - center, width
    a, b = prepare_radiograph(m2, R), prepare_radiograph(m1, R)
    np.testing.assert_allclose(a.image, b.image, atol=1e-5)
    assert b.photometric == "MONOCHROME1" and a.photometric == "MONOCHROME2"
    disc = a.image[R // 2 - 4 : R // 2 + 4, R // 2 - 4 : R // 2 + 4]
    assert disc.mean() > 0.9 and b.image[:8, :8].mean() < 0.3  # bone bright, background dark


def test_window_preset_is_applied_and_clips() -> None:
    stored = np.full((64, 64), 2000, np.uint16)
    stored[:, :16], stored[:, 48:] = 100, 3900
    ds = _make_ds(stored, WindowCenter=2048, WindowWidth=1000)
    image = prepare_radiograph(ds, 64).image  # resolution = size: no resampling
    assert (image[:, :16] == 0.0).all() and (image[:, 48:] == 1.0).all()
    expected = (2000 - (2048 - 0.5)) / (1000 - 1) + 0.5  # PS3.3 C.11.2.1.2.1
    np.testing.assert_allclose(image[:, 16:48], expected, atol=1e-6)


@pytest.mark.parametrize(
    ("function", "expected"),
    [("LINEAR_EXACT", (2000 - 2048) / 1000 + 0.5), ("SIGMOID", 1 / (1 + np.exp(-4 * (2000 - 2048) / 1000)))],
)
def test_voi_lut_function_is_honoured(function: str, expected: float) -> None:
    ds = _make_ds(np.full((64, 64), 2000, np.uint16), WindowCenter=2048, WindowWidth=1000)
    ds.VOILUTFunction = function
    np.testing.assert_allclose(display_pixels(ds), expected, atol=1e-6)


def test_first_of_several_window_presets_is_used() -> None:
    stored = _phantom()
    several = _make_ds(stored, WindowCenter=[2048, 500], WindowWidth=[1000, 400])
    first = _make_ds(stored, WindowCenter=2048, WindowWidth=1000)
    second = _make_ds(stored, WindowCenter=500, WindowWidth=400)
    np.testing.assert_array_equal(display_pixels(several), display_pixels(first))
    assert not np.allclose(display_pixels(several), display_pixels(second))


def _voi_lut_item(descriptor: list[int], data: list[int]) -> Dataset:
    item = Dataset()
    item.add_new("LUTDescriptor", "US", descriptor)
    item.add_new("LUTData", "US", data)
    return item


@pytest.mark.parametrize("declared_bits", [12, 16])
def test_voi_lut_sequence_is_applied_before_windows(declared_bits: int) -> None:
    stored = _phantom()
    ds = _make_ds(stored, WindowCenter=2048, WindowWidth=1000)  # present but the LUT wins
    inverse = [4095 - v for v in range(4096)]
    ds.VOILUTSequence = [_voi_lut_item([4096, 0, declared_bits], inverse)]
    # A LUT declared 16-bit whose entries only reach 4095 is read as 12-bit, as dcmtk does.
    np.testing.assert_allclose(display_pixels(ds), 1 - stored / 4095, atol=1e-6)


def test_real_voi_lut_file_matches_dcmtk_rendering(tmp_path: Path) -> None:
    source = _testdata("vlut_04.dcm")
    reference = _dcmtk_display(source, ["+Wl", "1"], tmp_path / "vlut.png")
    np.testing.assert_allclose(display_pixels(pydicom.dcmread(source)), reference, atol=1e-4)


def test_rescale_slope_and_intercept_are_applied() -> None:
    stored = _phantom()
    rescaled = _make_ds(stored, RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=3000, WindowWidth=4000)
    # The same modality values stored directly (signed, no rescale) must display identically.
    values = (2 * stored.astype(np.int32) - 1000).astype(np.int16)
    direct = _make_ds(values, bits_stored=16, WindowCenter=3000, WindowWidth=4000)
    np.testing.assert_allclose(display_pixels(rescaled), display_pixels(direct), atol=1e-6)
    without = _make_ds(stored, WindowCenter=3000, WindowWidth=4000)
    assert not np.allclose(display_pixels(rescaled), display_pixels(without), atol=1e-2)


def test_real_modality_lut_sequence_matches_dcmtk_rendering(tmp_path: Path) -> None:
    source = _testdata("mlut_18.dcm")  # Modality LUT Sequence, no VOI: percentiles = min-max here
    reference = _dcmtk_display(source, ["+Wm"], tmp_path / "mlut.png")
    np.testing.assert_allclose(display_pixels(pydicom.dcmread(source)), reference, atol=1e-4)


def test_percentile_fallback_ignores_hot_pixels() -> None:
    stored = np.tile(np.linspace(0, 1000, 64), (64, 1)).astype(np.uint16)
    stored[0, :5] = 60000  # five hot pixels would squash a min-max stretch to 1/60 of the range
    image = display_pixels(_make_ds(stored, bits_stored=16))
    assert image.min() == 0.0 and (image[0, :5] == 1.0).all()
    assert 0.45 < float(np.median(image[1:])) < 0.55


def test_pixel_padding_is_black_and_excluded_from_percentiles() -> None:
    stored = np.tile(np.linspace(1000, 2000, 64), (64, 1)).astype(np.uint16)
    stored[:, :20] = 4095
    ds = _make_ds(stored, PixelPaddingValue=4095)
    image = display_pixels(ds)
    assert (image[:, :20] == 0.0).all()
    assert image[:, 20:].max() == 1.0 and image[:, 20:].min() == 0.0


# --- geometry: pad, resize, crop back -------------------------------------------------------------


@pytest.mark.parametrize(("rows", "columns"), [(300, 200), (200, 300), (257, 131)])
def test_pad_and_crop_round_trip_keeps_aspect_and_content(rows: int, columns: int) -> None:
    y, x = np.mgrid[0:rows, 0:columns]
    stored = (3000 + 800 * np.sin(x / 9.0) * np.cos(y / 13.0)).astype(np.uint16)
    stored[rows // 3 : rows // 2, columns // 3 : columns // 2] = 0  # the darkest value sits inside
    ds = _make_ds(stored, WindowCenter=2048, WindowWidth=4096, VOILUTFunction="LINEAR_EXACT")
    prepared = prepare_radiograph(ds, R)
    p = prepared.placement
    assert prepared.image.shape == (R, R) and prepared.image.dtype == np.float32
    assert (p.Rows, p.Columns, p.side) == (rows, columns, max(rows, columns))

    # The pad is black (the image minimum), exactly outside the recorded region; nothing was stretched.
    region = np.zeros((R, R), bool)
    region[p.crop_top : p.crop_top + p.crop_rows, p.crop_left : p.crop_left + p.crop_columns] = True
    assert (prepared.image[~region] == 0.0).all() and prepared.image[region].min() == 0.0
    assert (prepared.image[region] > 0.5).mean() > 0.8

    restored = restore_views(np.stack([prepared.image, 1 - prepared.image]), p)
    assert max(restored.Rows, restored.Columns) == R
    assert (restored.Rows, restored.Columns) == (p.crop_rows, p.crop_columns)
    assert abs(restored.Rows / restored.Columns - rows / columns) < 0.02

    source = (stored / 4096).astype(np.float32)  # LINEAR_EXACT over the whole range is x / 4096
    resized = Image.fromarray(source).resize((restored.Columns, restored.Rows), Image.Resampling.LANCZOS)
    expected = np.clip(np.asarray(resized), 0, 1)
    got = restored.pixels[0].astype(np.float64) / 4095
    # The crop is exactly the source at model scale: only 12-bit quantisation separates them.
    np.testing.assert_allclose(got, expected, atol=2e-4)
    np.testing.assert_allclose(restored.pixels[1].astype(np.float64) / 4095, 1 - expected, atol=2e-4)


def test_restored_views_are_12_bit_monochrome2_with_own_windows() -> None:
    placement = Placement(Rows=100, Columns=100, side=100, top=0, left=0, resolution=64)
    dim = np.full((64, 64), 0.2, np.float32)
    dim[:, 32:] = 0.3
    bright = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    restored = restore_views(np.stack([dim, bright]), placement)
    assert isinstance(restored, RestoredViews) and restored.bits_stored == 12
    assert all(px.dtype == np.uint16 and px.shape == (64, 64) for px in restored.pixels)
    assert restored.pixels[1].max() == 4095 and restored.pixels[1].min() == 0
    lo, hi = int(restored.pixels[0].min()), int(restored.pixels[0].max())
    assert (lo, hi) in ((819, 1228), (819, 1229))
    # The dim half is background by the body rule (within 2 % of the range above the minimum): the
    # window sits on the other half (synthesis/voi_window.py).
    assert restored.window_center[0] == hi + 0.5 and restored.window_width[0] == 1
    # A ramp has no background but its lowest 2 %: the window spans its 10th..99th percentile.
    body_lo, body_hi = 4095 * (0.02 + 0.98 * 0.10), 4095 * (0.02 + 0.98 * 0.99)
    assert restored.window_width[1] == pytest.approx(body_hi - body_lo, abs=4)
    assert restored.window_center[1] == pytest.approx((body_lo + body_hi) / 2, abs=4)
    flat = restore_views(np.full((1, 64, 64), 0.5, np.float32), placement)
    assert flat.window_width == (1.0,)


@pytest.mark.parametrize(
    ("views", "reason"),
    [
        (np.zeros((64, 64), np.float32), "shape"),
        (np.zeros((1, 32, 32), np.float32), "shape"),
        (np.full((1, 64, 64), np.nan, np.float32), "NaN"),
        (np.full((1, 64, 64), 1.5, np.float32), r"\[0, 1\]"),
    ],
)
def test_restore_refuses_bad_views(views: np.ndarray, reason: str) -> None:
    placement = Placement(Rows=64, Columns=64, side=64, top=0, left=0, resolution=64)
    with pytest.raises(SynthesisError, match=reason):
        restore_views(views, placement)


def test_placement_and_prepared_validate_on_construction() -> None:
    with pytest.raises(SynthesisError, match="long side"):
        Placement(Rows=100, Columns=50, side=90, top=0, left=20, resolution=64)
    with pytest.raises(SynthesisError, match="left"):
        Placement(Rows=100, Columns=50, side=100, top=0, left=60, resolution=64)
    placement = Placement(Rows=64, Columns=64, side=64, top=0, left=0, resolution=64)
    with pytest.raises(SynthesisError, match="shape"):
        PreparedRadiograph(np.zeros((32, 32), np.float32), placement, False, "MONOCHROME2", 12)
    with pytest.raises(SynthesisError, match="outside"):
        PreparedRadiograph(np.full((64, 64), 2, np.float32), placement, False, "MONOCHROME2", 12)


# --- refusals ------------------------------------------------------------------------------------


def _multi_frame() -> Dataset:
    ds = _make_ds(np.zeros((2, 64, 64), np.uint16))
    assert ds.NumberOfFrames == 2
    return ds


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (_multi_frame, "multi-frame"),
        (lambda: _read("SC_rgb.dcm"), "colour.*RGB"),
        (lambda: _read("SC_ybr_full_uncompressed.dcm"), "colour.*YBR_FULL"),
        (lambda: _make_ds(np.zeros((32, 100), np.uint16)), "too small: 32x100"),
        (lambda: pydicom.dcmread(_testdata("RG3_UNCR.dcm"), stop_before_pixels=True), "no Pixel Data"),
        (lambda: _read("MR_small.dcm"), "MR Image Storage"),
        (lambda: _read("JPEG-lossy.dcm"), r"JPEG Extended.*could not be decoded"),
        (lambda: _make_ds(np.full((64, 64), 7, np.uint16)), "constant"),
    ],
)
def test_unusable_inputs_raise_with_the_reason(make, reason: str) -> None:
    with pytest.raises(SynthesisError, match=reason):
        prepare_radiograph(make(), R)


def test_palette_colour_is_refused_even_without_sop_class_check() -> None:
    with pytest.raises(SynthesisError, match="colour.*PALETTE COLOR"):
        display_pixels(_read("OBXXXX1A.dcm"))  # US: prepare_radiograph refuses it by SOP Class first


def test_transfer_syntax_without_decoder_is_named() -> None:
    ds = _make_ds(_phantom())
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    with pytest.raises(SynthesisError, match="MPEG2 Main Profile.*has no pixel data decoder"):
        prepare_radiograph(ds, R)


@pytest.mark.parametrize("resolution", [0, -64, 64.0])
def test_bad_resolution_is_refused(resolution) -> None:
    with pytest.raises(SynthesisError, match="resolution"):
        prepare_radiograph(_make_ds(_phantom()), resolution)


# --- real files: CR through the full path, every compressed transfer syntax ----------------------


@pytest.fixture(scope="module")
def rg1() -> PreparedRadiograph:
    """The uncompressed CR (MONOCHROME1, 15 bits stored, portrait 1955x1841, one window)."""
    return prepare_radiograph(_read("RG1_UNCR.dcm"), R)


def test_real_cr_reports_source_facts(rg1: PreparedRadiograph) -> None:
    assert rg1.photometric == "MONOCHROME1" and rg1.bits_stored == 15 and rg1.lossy is False
    assert rg1.placement == Placement(Rows=1955, Columns=1841, side=1955, top=0, left=57, resolution=R)
    # Its window spans the whole 15-bit range, so nothing is black: the pad takes the image minimum.
    p = rg1.placement
    assert (rg1.image[:, : p.crop_left] == rg1.image.min()).all() and 0.05 < rg1.image.min() < 0.2
    assert rg1.image.max() > 0.95


def test_real_cr_display_matches_dcmtk_rendering(tmp_path: Path) -> None:
    source = _testdata("RG1_UNCR.dcm")  # MONOCHROME1 + window: dcmtk inverts and windows the same way
    reference = _dcmtk_display(source, ["+Wi", "1"], tmp_path / "rg1.png")
    np.testing.assert_allclose(display_pixels(pydicom.dcmread(source)), reference, atol=1e-4)


@pytest.mark.parametrize("stem", ["RG1", "RG3"])
def test_real_cr_jpeg2000_variants(stem: str) -> None:
    reference = prepare_radiograph(_read(f"{stem}_UNCR.dcm"), R)
    lossless = prepare_radiograph(_read(f"{stem}_J2KR.dcm"), R)  # JPEG 2000 lossless
    lossy = prepare_radiograph(_read(f"{stem}_J2KI.dcm"), R)  # JPEG 2000 (irreversible)
    decompressed = prepare_radiograph(_read(f"{stem}_UNCI.dcm"), R)  # native, but once lossy: LIC 01
    np.testing.assert_array_equal(lossless.image, reference.image)
    assert np.abs(lossy.image - reference.image).mean() < 0.01
    assert not np.array_equal(lossy.image, reference.image)
    np.testing.assert_array_equal(decompressed.image, lossy.image)
    assert (reference.lossy, lossless.lossy, lossy.lossy, decompressed.lossy) == (False, False, True, True)


@pytest.mark.parametrize(
    ("tool", "args", "TransferSyntaxUID"),
    [
        ("dcmcjpeg", ["+e1"], "1.2.840.10008.1.2.4.70"),  # JPEG lossless, SV1
        ("dcmcjpeg", ["+el"], "1.2.840.10008.1.2.4.57"),  # JPEG lossless, process 14
        ("dcmcjpls", ["+el"], "1.2.840.10008.1.2.4.80"),  # JPEG-LS lossless
        ("dcmcrle", [], "1.2.840.10008.1.2.5"),  # RLE lossless
        ("dcmconv", ["+td"], "1.2.840.10008.1.2.1.99"),  # deflated explicit VR little endian
    ],
)
def test_real_cr_lossless_transcodes_prepare_identically(
    rg1: PreparedRadiograph, tmp_path: Path, tool: str, args: list[str], TransferSyntaxUID: str
) -> None:
    ds = _transcode(tool, args, _testdata("RG1_UNCR.dcm"), tmp_path / "out.dcm")
    assert ds.file_meta.TransferSyntaxUID == TransferSyntaxUID
    prepared = prepare_radiograph(ds, R)
    np.testing.assert_array_equal(prepared.image, rg1.image)
    assert prepared.lossy is False


def test_real_cr_jpeg_ls_near_lossless_is_close_and_lossy(rg1: PreparedRadiograph, tmp_path: Path) -> None:
    ds = _transcode("dcmcjpls", ["+en", "+md", "8"], _testdata("RG1_UNCR.dcm"), tmp_path / "nl.dcm")
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.81"
    prepared = prepare_radiograph(ds, R)
    assert prepared.lossy is True
    assert np.abs(prepared.image - rg1.image).max() < 0.01


def test_real_jpeg_baseline_is_close_and_lossy(tmp_path: Path) -> None:
    source = _testdata("image_dfl.dcm")  # 8-bit SC, itself deflated
    reference = prepare_radiograph(pydicom.dcmread(source), R)
    assert reference.lossy is False
    ds = _transcode("dcmcjpeg", ["+eb"], source, tmp_path / "baseline.dcm")
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"
    prepared = prepare_radiograph(ds, R)
    assert prepared.lossy is True
    assert np.abs(prepared.image - reference.image).mean() < 0.02


@pytest.mark.parametrize(
    ("name", "TransferSyntaxUID"),
    [
        ("JPEG-LL.dcm", "1.2.840.10008.1.2.4.70"),  # SC, JPEG lossless 16-bit signed
        ("JPGLosslessP14SV1_1s_1f_8b.dcm", "1.2.840.10008.1.2.4.70"),  # US, 8-bit
        ("JPGExtended.dcm", "1.2.840.10008.1.2.4.51"),  # SC, JPEG extended 12-bit (lossy)
    ],
)
def test_real_jpeg_files_decode_like_dcmtk(tmp_path: Path, name: str, TransferSyntaxUID: str) -> None:
    source = _read(name)
    assert source.file_meta.TransferSyntaxUID == TransferSyntaxUID
    native = _transcode("dcmdjpeg", [], _testdata(name), tmp_path / "native.dcm")
    assert not UID(native.file_meta.TransferSyntaxUID).is_compressed
    decoded, reference = source.pixel_array.astype(np.int64), native.pixel_array.astype(np.int64)
    if source.LossyImageCompression == "01":
        # Lossy JPEG: ISO 10918-2 lets IDCT implementations differ, by one stored value at most here.
        assert np.abs(decoded - reference).max() <= 1 and np.abs(decoded - reference).mean() < 0.05
    else:
        np.testing.assert_array_equal(decoded, reference)
        np.testing.assert_array_equal(display_pixels(source), display_pixels(native))


MR_SMALL_LOSSLESS = ["MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm"]


@pytest.mark.parametrize("name", MR_SMALL_LOSSLESS)
def test_real_lossless_files_decode_like_native(name: str) -> None:
    np.testing.assert_array_equal(display_pixels(_read(name)), display_pixels(_read("MR_small.dcm")))


def test_real_sc_jpeg2000_matches_its_decompressed_twin() -> None:
    lossy = prepare_radiograph(_read("JPEG2000.dcm"), R)
    twin = prepare_radiograph(_read("JPEG2000_UNC.dcm"), R)
    np.testing.assert_array_equal(lossy.image, twin.image)
    assert lossy.lossy and twin.lossy  # .91 is lossy by syntax; the twin says LIC 01
    assert lossy.placement.left == 384  # 1024x256 portrait, centred in the square
