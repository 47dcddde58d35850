"""The rotation sweep (Multi-frame Grayscale Word SC): dciodvfy-clean, same markings as the views,
frames in angle order, and a real Orthanc renders every frame."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from dicomnode.derived import build_derived_instances
from dicomnode.derived_sweep import build_sweep_instance, frame_label, sweep_uids
from dicomnode.errors import SynthesisError
from tests.peers import Orthanc
from tests.test_derived import GENERATOR, STUDY_KEYWORDS, WHEN, dciodvfy_errors, full_cr_source, random_views

MF_WORD_SC = "1.2.840.10008.5.1.4.1.1.7.3"
VIEWS = [(30.0, 0.0), (-90.0, 0.0), (0.0, 0.0), (-30.0, 0.0), (90.0, 0.0)]  # request order, not angle order
# Attributes that mark a single view synthetic; the sweep must carry each with the same value.
MARKINGS = (
    "SyntheticData",
    "ConversionType",
    "ImageType",
    "Modality",
    "ContributingEquipmentSequence",
    "SourceImageSequence",
    "ReferencedSeriesSequence",
    "DerivationCodeSequence",
    "CodingSchemeIdentificationSequence",
    "LossyImageCompression",
    "RecognizableVisualFeatures",
    "SecondaryCaptureDeviceManufacturer",
    "SecondaryCaptureDeviceManufacturerModelName",
    "Manufacturer",
)


def views_of(folder: Path, views: list[tuple[float, float]] = VIEWS) -> tuple[list[Dataset], list[np.ndarray]]:
    folder.mkdir(parents=True, exist_ok=True)
    source = full_cr_source(folder / "source.dcm")
    pixels = random_views(len(views), 12)
    built = build_derived_instances(source, pixels, 12, None, None, views, GENERATOR, 1, 2, 1.5, content_datetime=WHEN)
    return built, pixels


def test_sweep_is_valid_ordered_by_angle_and_marked_like_the_views(tmp_path: Path) -> None:
    views, pixels = views_of(tmp_path)
    sweep = build_sweep_instance(views, series_number=902, frame_time_ms=200)
    path = tmp_path / "sweep.dcm"
    sweep.save_as(path, enforce_file_format=True)
    errors, output = dciodvfy_errors(path)
    assert not errors, output

    back = pydicom.dcmread(path)
    assert back.SOPClassUID == MF_WORD_SC and back.file_meta.MediaStorageSOPClassUID == MF_WORD_SC
    assert int(back.NumberOfFrames) == len(VIEWS)
    order = sorted(range(len(VIEWS)), key=lambda i: VIEWS[i])
    frames = back.pixel_array
    for frame, index in zip(frames, order, strict=True):
        assert np.array_equal(frame, pixels[index]), "frames are the views, ordered by azimuth"
    assert list(back.FrameLabelVector) == ["az -90", "az -30", "az 0", "az 30", "az 90"]
    assert float(back.FrameTime) == 200.0 and int(back.CineRate) == 5
    assert Tag("FrameTime") in [Tag(t) for t in back.FrameIncrementPointer]
    assert back.BitsAllocated == 16 and back.BitsStored == 12 and back.PhotometricInterpretation == "MONOCHROME2"
    assert back.BurnedInAnnotation == "NO" and back.PresentationLUTShape == "IDENTITY"
    assert "ROTATION SWEEP" in back.ImageComments and "not for diagnosis" in back.ImageComments
    assert "-90, -30, 0, 30, 90" in back.ImageComments
    assert "frame_azimuths_deg=[-90.0, -30.0, 0.0, 30.0, 90.0]" in back.DerivationDescription
    assert "azimuth_deg=" not in back.DerivationDescription.replace("frame_azimuths_deg", "")
    assert "SYNTHETIC" in back.SeriesDescription and "sweep" in back.SeriesDescription
    assert back.SeriesNumber == 902 and back.SeriesInstanceUID != views[0].SeriesInstanceUID
    views[order[0]].save_as(tmp_path / "first.dcm", enforce_file_format=True)
    first = pydicom.dcmread(tmp_path / "first.dcm")  # the first frame's single view, read back
    for keyword in (*MARKINGS, *STUDY_KEYWORDS):
        assert back.get(keyword) == first.get(keyword), keyword
    device_uids = {item.get("DeviceUID") for item in back.ContributingEquipmentSequence}
    assert GENERATOR.device_uid in device_uids
    # One window spans every frame's own window (each view's window shows its body, not its full range).
    def bounds(ds: pydicom.Dataset) -> tuple[float, float]:
        center, width = float(ds.WindowCenter), float(ds.WindowWidth)
        return center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2

    low, high = bounds(back)
    assert low <= min(bounds(v)[0] for v in views) and high >= max(bounds(v)[1] for v in views)
    assert high - low < 4095, "the sweep's window is the views' windows, not the whole 12-bit range"


def test_sweep_uids_are_deterministic_and_distinct_from_the_views(tmp_path: Path) -> None:
    views, _ = views_of(tmp_path)
    one = build_sweep_instance(views)
    again = build_sweep_instance(list(reversed(views)))
    assert (one.SOPInstanceUID, one.SeriesInstanceUID) == (again.SOPInstanceUID, again.SeriesInstanceUID)
    assert (one.SeriesInstanceUID, one.SOPInstanceUID) == sweep_uids([v.SOPInstanceUID for v in views])
    assert one.SOPInstanceUID not in {v.SOPInstanceUID for v in views}
    assert build_sweep_instance(views[:3]).SOPInstanceUID != one.SOPInstanceUID


def test_sweep_refuses_too_few_or_unlike_views(tmp_path: Path) -> None:
    views, _ = views_of(tmp_path)
    with pytest.raises(SynthesisError, match="at least two"):
        build_sweep_instance(views[:1])
    other, _ = views_of(tmp_path / "other")
    with pytest.raises(SynthesisError, match="differ in"):
        build_sweep_instance([views[0], other[1]])
    with pytest.raises(SynthesisError, match="frame_time_ms"):
        build_sweep_instance(views, frame_time_ms=0)


def test_frame_labels_fit_a_short_string() -> None:
    assert frame_label(-30.0, 0.0) == "az -30"
    assert frame_label(45.0, 10.0) == "az 45 el 10"
    for azimuth, elevation in ((-179.123456, -89.987654), (12.5, -0.25), (180.0, 90.0)):
        assert 0 < len(frame_label(azimuth, elevation)) <= 16


def test_orthanc_renders_every_frame(tmp_path: Path) -> None:
    views, _ = views_of(tmp_path)
    sweep = build_sweep_instance(views)
    path = tmp_path / "sweep.dcm"
    sweep.save_as(path, enforce_file_format=True)
    orthanc = Orthanc(tmp_path / "orthanc").start()
    try:
        stored = orthanc.post("/instances", path.read_bytes())
        assert stored["Status"] == "Success", stored
        instance = stored["ID"]
        tags = orthanc.get(f"/instances/{instance}/simplified-tags")
        assert tags["SOPClassUID"] == MF_WORD_SC and tags["StudyInstanceUID"] == views[0].StudyInstanceUID
        frames = orthanc.get(f"/instances/{instance}/frames")
        assert frames == list(range(len(VIEWS)))
        pngs = [orthanc.get(f"/instances/{instance}/frames/{n}/preview") for n in frames]
        for png in pngs:
            assert isinstance(png, bytes) and png[:8] == b"\x89PNG\r\n\x1a\n"
        assert len(set(pngs)) == len(VIEWS), "each frame renders its own image"
    finally:
        orthanc.stop()
