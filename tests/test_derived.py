"""The derived-instance writer: built from real radiographs, written, checked with dciodvfy, read back.

The attribute checks follow the table in /work/shared/dicom-conventions.md.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from datetime import datetime
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from dicomnode.derived import (
    DerivedUids,
    GeneratorInfo,
    build_derived_instances,
    derived_uids,
    device_uid_for,
    is_lossy_source,
    series_description_for,
    view_angles_of,
    view_patient_orientation,
    window_for,
)
from dicomnode.derived_codes import PRIVATE_SCHEME_DESIGNATOR
from dicomnode.errors import ConfigError, DicomInputError, SynthesisError

WEIGHTS = "3f" * 32  # a sha256 hex digest
GENERATOR = GeneratorInfo(
    model_name="svdrr-dit-fb-256",
    model_version="1.0.0",
    model_identity=WEIGHTS,
    node_version="0.1.0",
    institution_name="Test Hospital",
)
SWEEP = [(-90.0, 0.0), (-30.0, 0.0), (0.0, 0.0), (30.0, 0.0), (60.0, 0.0), (90.0, 0.0)]
WHEN = datetime(2025, 3, 4, 5, 6, 7)
CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"

# Patient and General/Patient Study attributes a PACS matches or shows; all must survive unchanged.
STUDY_KEYWORDS = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "PatientBirthDate",
    "PatientSex",
    "OtherPatientIDsSequence",
    "PatientComments",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "IssuerOfAccessionNumberSequence",
    "StudyID",
    "StudyDescription",
    "ReferringPhysicianName",
    "ProcedureCodeSequence",
    "PhysiciansOfRecord",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
)


def shipped_file(name: str) -> str:
    """Path of a real DICOM file shipped by pydicom-data."""
    path = get_testdata_file(name)
    assert isinstance(path, str), f"{name} is not installed (pip install pydicom-data)"
    return path


def dciodvfy_errors(path: Path) -> tuple[list[str], str]:
    """The Error lines dciodvfy reports for `path`, and its whole output for the message.

    The installed dicom3tools (2022-06) predates Synthetic Data (0008,001C), which later
    editions of PS3.6 define; its "not a recognized standard attribute" error for that one tag
    is dropped here after checking pydicom's current dictionary knows the tag.
    """
    tool = "/usr/bin/dciodvfy" if Path("/usr/bin/dciodvfy").exists() else shutil.which("dciodvfy")
    if not tool:
        pytest.fail("dciodvfy is not installed (apt-get install dicom3tools)")
    run = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
    output = run.stdout + run.stderr
    assert keyword_for_tag(0x0008001C) == "SyntheticData"
    errors = [
        line
        for line in output.splitlines()
        if line.startswith("Error")
        and not ("not a recognized standard attribute" in line and "(0x0008,0x001c)" in line)
    ]
    return errors, output


def random_views(count: int, bits: int, seed: int = 7) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 1 << bits, size=(64, 48), dtype=np.uint16) for _ in range(count)]


def full_cr_source(path: Path, *, orientation: list[str] | None = ["L", "F"]) -> Dataset:  # noqa: B006
    """A CR knee radiograph with a full set of Patient and Study attributes,
    written to `path` and read back, as the node would receive it."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CR_IMAGE_STORAGE
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.Modality = "CR"
    ds.Manufacturer = "Acme Imaging"
    ds.ManufacturerModelName = "DR-1"
    ds.PatientName = "Doe^Jane^Q"
    ds.PatientID = "MRN-0042"
    ds.IssuerOfPatientID = "HOSP-A"
    qualifiers = Dataset()
    qualifiers.UniversalEntityID = "1.2.3.4.5"
    qualifiers.UniversalEntityIDType = "ISO"
    ds.IssuerOfPatientIDQualifiersSequence = [qualifiers]
    ds.PatientBirthDate = "19710203"
    ds.PatientSex = "F"
    other_id = Dataset()
    other_id.PatientID = "OLD-7"
    other_id.IssuerOfPatientID = "HOSP-B"
    other_id.TypeOfPatientID = "TEXT"
    ds.OtherPatientIDsSequence = [other_id]
    ds.PatientComments = "none"
    ds.StudyDate = "20250301"
    ds.StudyTime = "101500"
    ds.AccessionNumber = "ACC-991"
    issuer = Dataset()
    issuer.LocalNamespaceEntityID = "RIS-A"
    ds.IssuerOfAccessionNumberSequence = [issuer]
    ds.StudyID = "S-17"
    ds.StudyDescription = "KNEE LEFT 2 VIEWS"
    ds.ReferringPhysicianName = "House^Gregory"
    procedure = Dataset()
    procedure.CodeValue = "RPID2499"
    procedure.CodingSchemeDesignator = "RADLEX"
    procedure.CodeMeaning = "XR KNEE LEFT 2 VIEWS"
    ds.ProcedureCodeSequence = [procedure]
    ds.PhysiciansOfRecord = "Cuddy^Lisa"
    ds.PatientAge = "054Y"
    ds.PatientSize = "1.68"
    ds.PatientWeight = "61.5"
    ds.SeriesNumber = 3
    ds.InstanceNumber = 1
    ds.BodyPartExamined = "KNEE"
    ds.ViewPosition = "PA"
    ds.Laterality = "L"
    ds.PatientOrientation = orientation
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionRatio = "12.5"
    ds.LossyImageCompressionMethod = "ISO_10918_1"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.Rows, ds.Columns = 32, 24
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = random_views(1, 12, seed=3)[0][:32, :24].tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return pydicom.dcmread(path)


def write_and_verify(instances: list[Dataset], folder: Path) -> list[Dataset]:
    """Write each instance as a PS3.10 file, run dciodvfy on it, read it back."""
    read_back: list[Dataset] = []
    for index, ds in enumerate(instances):
        path = folder / f"derived_{index}.dcm"
        ds.save_as(path, enforce_file_format=True)
        errors, output = dciodvfy_errors(path)
        assert not errors, f"dciodvfy errors for view {index}:\n{output}"
        read_back.append(pydicom.dcmread(path))
    return read_back


def contributing_item(ds: Dataset, code_value: str, scheme: str) -> Dataset:
    found = [
        item
        for item in ds.ContributingEquipmentSequence
        if item.PurposeOfReferenceCodeSequence[0].CodeValue == code_value
        and item.PurposeOfReferenceCodeSequence[0].CodingSchemeDesignator == scheme
    ]
    assert len(found) == 1, f"expected one ({code_value}, {scheme}) item, found {len(found)}"
    return found[0]


def check_derived(ds: Dataset, source: Dataset, number: int, view: tuple[float, float], bits: int) -> None:
    """Every row of the conventions table, on one instance read back from its file."""
    assert ds.SOPClassUID == SecondaryCaptureImageStorage
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.StudyInstanceUID == source.StudyInstanceUID
    assert ds.SeriesInstanceUID != source.SeriesInstanceUID
    assert ds.SOPInstanceUID != source.SOPInstanceUID
    assert ds.SeriesNumber == 901
    assert ds.InstanceNumber == number
    assert "SYNTHETIC" in ds.SeriesDescription and len(ds.SeriesDescription) <= 64
    assert ds.SyntheticData == "YES"
    assert ds.ConversionType == "SYN"
    assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert ds.Modality == "OT"
    assert ds.PhotometricInterpretation == "MONOCHROME2"
    assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit) == (16, bits, bits - 1)
    assert "PixelSpacing" not in ds

    synthesizing = contributing_item(ds, "109100", "DCM")
    assert synthesizing.PurposeOfReferenceCodeSequence[0].CodeMeaning == "Synthesizing Equipment"
    assert synthesizing.Manufacturer == "dicomnode"
    assert synthesizing.ManufacturerModelName == GENERATOR.model_name
    assert list(synthesizing.SoftwareVersions) == [GENERATOR.model_version, GENERATOR.node_version]
    assert synthesizing.DeviceUID == device_uid_for(WEIGHTS)
    assert synthesizing.ContributionDateTime.startswith("20250304050607")
    assert synthesizing.ContributionDescription
    algorithm = contributing_item(ds, "Newcode1", "99IHE")
    assert algorithm.PurposeOfReferenceCodeSequence[0].CodeMeaning == "Processing Algorithm"
    assert algorithm.DeviceUID == GENERATOR.device_uid
    contributing_item(ds, "109102", "DCM")  # highdicom's own item is kept

    (source_image,) = ds.SourceImageSequence
    assert source_image.ReferencedSOPClassUID == source.SOPClassUID
    assert source_image.ReferencedSOPInstanceUID == source.SOPInstanceUID
    purpose = source_image.PurposeOfReferenceCodeSequence[0]
    assert (purpose.CodeValue, purpose.CodingSchemeDesignator) == ("121322", "DCM")
    (series,) = ds.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == source.SeriesInstanceUID
    assert series.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert series.ReferencedInstanceSequence[0].ReferencedSOPClassUID == source.SOPClassUID

    assert "not an acquired image" in ds.DerivationDescription
    assert GENERATOR.model_name in ds.DerivationDescription and "seed=11" in ds.DerivationDescription
    assert view_angles_of(ds) == view
    (derivation,) = ds.DerivationCodeSequence
    assert derivation.CodingSchemeDesignator == PRIVATE_SCHEME_DESIGNATOR
    declared = [item.CodingSchemeDesignator for item in ds.CodingSchemeIdentificationSequence]
    assert PRIVATE_SCHEME_DESIGNATOR in declared and "99IHE" in declared
    assert ds.BurnedInAnnotation == "NO"
    assert ds.RecognizableVisualFeatures == "NO"
    assert ds.WindowCenterWidthExplanation == "SYNTHETIC"
    comments = ds.ImageComments.lower()
    assert "synthetic" in comments and "not an acquired image" in comments and "not for diagnosis" in comments
    assert f"azimuth {view[0]:g}" in ds.ImageComments

    for keyword in STUDY_KEYWORDS:
        if keyword in source:
            assert keyword in ds, f"{keyword} was not copied"
            assert ds[keyword].value == source[keyword].value, f"{keyword} differs from the source"


def test_device_uid_is_a_valid_uid_per_weights() -> None:
    uid = device_uid_for(WEIGHTS)
    assert uid == device_uid_for(WEIGHTS) == GENERATOR.device_uid
    assert uid.startswith("2.25.") and UID(uid).is_valid and len(uid) <= 64
    assert device_uid_for("4e" * 32) != uid


def test_derived_uids_are_deterministic_and_follow_their_inputs() -> None:
    source = "1.2.3.4"
    base = derived_uids(source, WEIGHTS, SWEEP, seed=1)
    assert base == derived_uids(source, WEIGHTS, [(float(a), e) for a, e in SWEEP], seed=1)
    assert len(base.sop_instance_uids) == len(SWEEP)
    changed = [
        derived_uids(source, WEIGHTS, SWEEP, seed=2),
        derived_uids(source, "4e" * 32, SWEEP, seed=1),
        derived_uids("1.2.3.5", WEIGHTS, SWEEP, seed=1),
        derived_uids(source, WEIGHTS, SWEEP, seed=1, request_key="job-2"),
        derived_uids(source, WEIGHTS, [*SWEEP[:-1], (85.0, 0.0)], seed=1),
        derived_uids(source, WEIGHTS, [*SWEEP[:-1], (90.0, 5.0)], seed=1),
    ]
    all_uids = {base.series_instance_uid, *base.sop_instance_uids}
    for other in changed:
        assert other.series_instance_uid != base.series_instance_uid
        all_uids |= {other.series_instance_uid, *other.sop_instance_uids}
    for uid in all_uids:
        assert uid.startswith("2.25.") and UID(uid).is_valid and len(uid) <= 64, uid
    # An instance UID depends on its own view only: the same angle in another list keeps it.
    shorter = derived_uids(source, WEIGHTS, [(0.0, 0.0), (-30.0, 0.0)], seed=1)
    assert shorter.sop_instance_uids == (base.sop_instance_uids[2], base.sop_instance_uids[1])
    assert changed[4].sop_instance_uids[:-1] == base.sop_instance_uids[:-1]
    assert changed[4].sop_instance_uids[-1] != base.sop_instance_uids[-1]
    # -0.0 and 0 name the same view.
    negative_zero = derived_uids(source, WEIGHTS, [(-0.0, 0)], seed=1)
    assert negative_zero == derived_uids(source, WEIGHTS, [(0, 0.0)], seed=1)


@pytest.mark.parametrize(
    "views",
    [
        [],
        [(0.0, 0.0), (0.0, 0.0)],
        [(180.0, 0.0), (-180.0, 0.0)],
        [(181.0, 0.0)],
        [(0.0, -91.0)],
        [(float("nan"), 0.0)],
        [(1.0,)],
    ],
)
def test_derived_uids_refuse_bad_views(views: list[tuple[float, float]]) -> None:
    with pytest.raises(SynthesisError):
        derived_uids("1.2.3.4", WEIGHTS, views, seed=1)


def test_derived_uids_object_checks_itself() -> None:
    with pytest.raises(SynthesisError, match="not a valid UID"):
        DerivedUids("1.2.3", ("1.2.3.x",))
    with pytest.raises(SynthesisError, match="not all different"):
        DerivedUids("1.2.3", ("1.2.4", "1.2.4"))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("model_identity", "not-hex"),
        ("model_identity", "ABCDEF0123456789"),
        ("model_name", ""),
        ("model_name", "x" * 65),
        ("model_version", "1\\2"),
        ("institution_name", "bad\nname"),
    ],
)
def test_generator_info_refuses_invalid_values(field: str, value: str) -> None:
    values = {"model_name": "m", "model_version": "1", "model_identity": WEIGHTS, "node_version": "0.1.0"}
    values[field] = value
    with pytest.raises(ConfigError, match=field):
        GeneratorInfo(**values)


@pytest.mark.parametrize(
    ("name", "lossy"),
    [("RG1_UNCR.dcm", False), ("RG1_J2KR.dcm", False), ("RG1_UNCI.dcm", True), ("RG1_J2KI.dcm", True)],
)
def test_is_lossy_source_on_real_files(name: str, lossy: bool) -> None:
    assert is_lossy_source(pydicom.dcmread(shipped_file(name), stop_before_pixels=True)) is lossy


@pytest.mark.parametrize(
    ("source", "azimuth", "expected"),
    [
        (["L", "F"], 0, ("L", "F")),
        (["L", "F"], 90, ("P", "F")),
        (["L", "F"], -90, ("A", "F")),
        (["L", "F"], 30, ("LP", "F")),
        (["L", "F"], 60, ("PL", "F")),
        (["L", "F"], -30, ("LA", "F")),
        (["L", "F"], 180, ("R", "F")),
        (["R", "F"], 90, ("A", "F")),
        (["L", "H"], 90, ("A", "H")),
        (["LP", "F"], 45, ("P", "F")),
        (["F", "L"], 30, None),
        (["L", "A"], 30, None),
        ([], 30, None),
        (None, 0, None),
        ("L\\F", 90, ("P", "F")),
    ],
)
def test_view_patient_orientation(source: list[str] | None, azimuth: float, expected: tuple | None) -> None:
    assert view_patient_orientation(source, azimuth) == expected


def test_window_and_series_description() -> None:
    # A body (values 1000..3000) on a black surround: the window spans the body's 10th..99th
    # percentile, not the whole range (synthesis/voi_window.py).
    array = np.zeros((64, 64), dtype=np.uint16)
    array[8:56, 8:56] = np.linspace(1000, 3000, 48 * 48).reshape(48, 48)
    center, width = window_for(array)
    body = array[8:56, 8:56]
    low, high = np.percentile(body, (10, 99))
    assert (center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2) == (np.floor(low), np.ceil(high))
    assert series_description_for("SYNTHETIC", SWEEP) == "SYNTHETIC AI views az -90..90 (6)"
    assert series_description_for("SYNTHETIC", [(22.5, -10.0)]) == "SYNTHETIC AI view az 22.5 el -10"
    many = [(float(a), float(e)) for a in range(-90, 91, 5) for e in (-12.5, 7.25)]
    assert len(series_description_for("SYNTHETIC", many)) <= 64


def test_real_cr_gives_valid_synthetic_series(tmp_path: Path) -> None:
    source = pydicom.dcmread(shipped_file("RG1_UNCR.dcm"))
    pixels = random_views(len(SWEEP), 12)
    instances = build_derived_instances(
        source, pixels, 12, None, None, SWEEP, GENERATOR, seed=11, steps=20, guidance_scale=3.0,
        content_datetime=WHEN,
    )  # fmt: skip
    read_back = write_and_verify(instances, tmp_path)
    assert len({ds.SeriesInstanceUID for ds in read_back}) == 1
    assert len({ds.SOPInstanceUID for ds in read_back}) == len(SWEEP)
    expected_uids = derived_uids(source.SOPInstanceUID, WEIGHTS, SWEEP, seed=11)
    assert read_back[0].SeriesInstanceUID == expected_uids.series_instance_uid
    assert tuple(ds.SOPInstanceUID for ds in read_back) == expected_uids.sop_instance_uids
    for number, (ds, view, array) in enumerate(zip(read_back, SWEEP, pixels, strict=True), 1):
        check_derived(ds, source, number, view, 12)
        np.testing.assert_array_equal(ds.pixel_array, array)
        center, width = window_for(array)
        assert (float(ds.WindowCenter), float(ds.WindowWidth)) == pytest.approx((center, width))
        assert tuple(ds.PatientOrientation) == view_patient_orientation(["L", "F"], view[0])
        assert "LossyImageCompression" not in ds  # RG1_UNCR never went through lossy compression
        assert ds.BodyPartExamined == "CHEST"
    assert [list(ds.PatientOrientation) for ds in read_back] == [
        ["A", "F"], ["LA", "F"], ["L", "F"], ["LP", "F"], ["PL", "F"], ["P", "F"],
    ]  # fmt: skip
    # The same request again gives the same UIDs: a retried job never duplicates the series.
    again = build_derived_instances(
        source, pixels, 12, None, None, SWEEP, GENERATOR, seed=11, steps=20, guidance_scale=3.0
    )
    assert [ds.SOPInstanceUID for ds in again] == [ds.SOPInstanceUID for ds in read_back]


def test_full_source_keeps_study_and_lossy_history(tmp_path: Path) -> None:
    source = full_cr_source(tmp_path / "source.dcm")
    source_errors, source_output = dciodvfy_errors(tmp_path / "source.dcm")
    assert not source_errors, f"the test's own CR source is not valid:\n{source_output}"
    views = [(-45.0, 0.0), (45.0, 10.0)]
    instances = build_derived_instances(
        source, random_views(2, 16), 16, [30000.0, 31000.5], [40000.0, 50000.0], views, GENERATOR,
        seed=11, steps=30, guidance_scale=2.5, content_datetime=WHEN,
    )  # fmt: skip
    # Outputs share no element objects with the source or with each other.
    assert source == pydicom.dcmread(tmp_path / "source.dcm")
    instances[0].PatientName = "Changed^Later"
    instances[0].OtherPatientIDsSequence[0].PatientID = "CHANGED"
    assert source.PatientName == instances[1].PatientName == "Doe^Jane^Q"
    assert source.OtherPatientIDsSequence[0].PatientID == instances[1].OtherPatientIDsSequence[0].PatientID
    instances[0].PatientName = source.PatientName
    instances[0].OtherPatientIDsSequence[0].PatientID = source.OtherPatientIDsSequence[0].PatientID
    (out_dir := tmp_path / "out").mkdir()
    read_back = write_and_verify(instances, out_dir)
    for number, (ds, view) in enumerate(zip(read_back, views, strict=True), 1):
        check_derived(ds, source, number, view, 16)
        for keyword in STUDY_KEYWORDS:
            assert ds[keyword].value == source[keyword].value, keyword
        assert ds.LossyImageCompression == "01"
        assert float(ds.LossyImageCompressionRatio) == 12.5
        assert ds.LossyImageCompressionMethod == "ISO_10918_1"
        assert ds.Laterality == "L" and ds.BodyPartExamined == "KNEE"
        assert ds.InstitutionName == "Test Hospital"
        assert "steps=30" in ds.DerivationDescription and "guidance_scale=2.5" in ds.DerivationDescription
    assert (float(read_back[1].WindowCenter), float(read_back[1].WindowWidth)) == (31000.5, 50000.0)
    assert [list(ds.PatientOrientation) for ds in read_back] == [["LA", "F"], ["LP", "F"]]
    assert read_back[0].SeriesDescription == "SYNTHETIC AI views az -45..45 el 0..10 (2)"


def test_lossy_transfer_syntax_and_flag_are_carried(tmp_path: Path) -> None:
    compressed = pydicom.dcmread(shipped_file("RG1_J2KI.dcm"))
    (ds,) = build_derived_instances(
        compressed, random_views(1, 12), 12, None, None, [(20.0, 0.0)], GENERATOR, seed=11, steps=20,
        guidance_scale=3.0,
    )  # fmt: skip
    (ds,) = write_and_verify([ds], tmp_path)
    assert ds.LossyImageCompression == "01" and float(ds.LossyImageCompressionRatio) == 10
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian  # written losslessly

    uncompressed = pydicom.dcmread(shipped_file("RG1_UNCR.dcm"))
    (flagged,) = build_derived_instances(
        uncompressed, random_views(1, 12), 12, None, None, [(20.0, 0.0)], GENERATOR, seed=11, steps=20,
        guidance_scale=3.0, source_lossy=True,
    )  # fmt: skip
    assert flagged.LossyImageCompression == "01"


def test_source_without_orientation_leaves_it_empty(tmp_path: Path) -> None:
    source = full_cr_source(tmp_path / "source.dcm", orientation=None)
    (ds,) = build_derived_instances(
        source, random_views(1, 10), 10, None, None, [(90.0, 0.0)], GENERATOR, seed=11, steps=20,
        guidance_scale=3.0, content_datetime=WHEN, modality="DX",
    )  # fmt: skip
    (out_dir := tmp_path / "out").mkdir()
    (ds,) = write_and_verify([ds], out_dir)
    assert "PatientOrientation" in ds and not ds.PatientOrientation
    assert ds.Modality == "DX"


def test_refuses_what_it_cannot_write(tmp_path: Path) -> None:
    source = pydicom.dcmread(shipped_file("RG1_UNCR.dcm"), stop_before_pixels=True)
    good = random_views(1, 12)
    view = [(10.0, 0.0)]

    def build(**changes: object) -> list[Dataset]:
        arguments: dict = dict(
            source=source, pixels=good, bits_stored=12, window_centers=None, window_widths=None,
            views=view, generator=GENERATOR, seed=11, steps=20, guidance_scale=3.0,
        )  # fmt: skip
        arguments.update(changes)
        return build_derived_instances(**arguments)

    with pytest.raises(SynthesisError, match="beyond bits_stored"):
        build(bits_stored=8)
    with pytest.raises(SynthesisError, match="uint16"):
        build(pixels=[good[0].astype(np.float32)])
    with pytest.raises(SynthesisError, match="2 pixel arrays for 1 views"):
        build(pixels=good * 2)
    with pytest.raises(SynthesisError, match="width"):
        build(window_centers=[100.0], window_widths=[0.0])
    with pytest.raises(SynthesisError, match="modality"):
        build(modality="ot")
    no_study = copy.deepcopy(source)
    del no_study.StudyInstanceUID
    with pytest.raises(DicomInputError, match="StudyInstanceUID"):
        build(source=no_study)
