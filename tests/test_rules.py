"""Routing rules and loop prevention on real pydicom datasets and real radiographs."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import Tag
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from dicomnode.config import LoopPreventionSettings, load_settings
from dicomnode.errors import ConfigError
from dicomnode.rules import InstanceFacts, Rule, facts_from_dataset, loop_reason, matching_rules

REPO = Path(__file__).resolve().parents[1]
CR = "1.2.840.10008.5.1.4.1.1.1"
DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
SC = "1.2.840.10008.5.1.4.1.1.7"
OUR_DEVICE_UID = generate_uid()
DEFAULT = LoopPreventionSettings()  # skip_derived = "secondary"
ALL_DERIVED = LoopPreventionSettings(skip_derived="all")
NO_DERIVED = LoopPreventionSettings(skip_derived="none")
SECONDARY_REASON = 'Image Type (0008,0008) is DERIVED\\SECONDARY (loop_prevention.skip_derived = "secondary")'
ALL_REASON = 'Image Type (0008,0008) value 1 is DERIVED (loop_prevention.skip_derived = "all")'


def pydicom_file(name: str) -> str:
    """Path of a real file shipped in pydicom-data."""
    path = get_testdata_file(name, read=False)
    assert isinstance(path, str), name
    return path


def radiograph(**attributes: object) -> Dataset:
    """A plain chest CR as a modality sends it, written to bytes and read back like a received file."""
    ds = Dataset()
    ds.SOPClassUID = CR
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    for keyword, value in attributes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(CR)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def round_trip(ds: Dataset, tmp_path: Path) -> Dataset:
    path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return pydicom.dcmread(path)


def equipment(manufacturer: str, device_uid: str | None, code: tuple[str, str, str]) -> Dataset:
    item = Dataset()
    item.Manufacturer = manufacturer
    if device_uid:
        item.DeviceUID = device_uid
    purpose = Dataset()
    purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning = code
    item.PurposeOfReferenceCodeSequence = [purpose]
    return item


SYNTHESIZING = ("109100", "DCM", "Synthesizing Equipment")
MODIFYING = ("109101", "DCM", "Acquisition Equipment")


def rule(**kw: object) -> Rule:
    return Rule(**{"name": "r", "azimuths": (30,), **kw})  # type: ignore[arg-type]


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")  # the odd values are the point
def test_facts_from_a_written_and_read_radiograph(tmp_path: Path) -> None:
    facts = facts_from_dataset(round_trip(radiograph(BodyPartExamined=" chest "), tmp_path))
    assert facts == InstanceFacts(
        sop_class_uid=CR,
        modality="CR",
        body_part_examined="chest",
        view_position="PA",
        image_type=("ORIGINAL", "PRIMARY"),
    )


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")
def test_facts_from_odd_and_missing_values(tmp_path: Path) -> None:
    ds = radiograph(SOPClassUID=None, BodyPartExamined=None, ViewPosition="", ImageType="derived", SyntheticData="yes")
    ds.ContributingEquipmentSequence = [Dataset(), equipment("  Acme ", None, MODIFYING)]
    facts = facts_from_dataset(round_trip(ds, tmp_path))
    assert facts.sop_class_uid == CR  # from the File Meta Information
    assert (facts.body_part_examined, facts.view_position) == ("", "")
    assert facts.image_type == ("DERIVED",) and facts.synthetic_data
    assert facts.contributing_device_uids == () and facts.contributing_manufacturers == ()  # not 109100
    assert facts_from_dataset(Dataset()) == InstanceFacts()


def test_facts_from_malformed_raw_elements() -> None:
    """Values pydicom cannot convert (truncated sequence, wrong length for the VR) read as missing."""
    ds = Dataset()
    ds.Modality = "CR"
    for tag, vr, value in [
        (0x0018A001, None, b"\x01\x02\x03\x04"),  # Contributing Equipment Sequence: not a sequence
        (0x0008001C, "US", b"\x01\x02\x03"),  # Synthetic Data: 3 bytes of US
        (0x00080008, "FD", b"\x01\x02\x03"),  # Image Type: 3 bytes of FD
    ]:
        ds[tag] = RawDataElement(Tag(tag), vr, len(value), value, 0, True, True)
    assert facts_from_dataset(ds) == InstanceFacts(modality="CR")


def test_facts_from_real_radiographs() -> None:
    chest = facts_from_dataset(pydicom.dcmread(pydicom_file("RG1_UNCR.dcm")))
    assert (chest.sop_class_uid, chest.modality, chest.body_part_examined, chest.view_position) == (
        CR,
        "CR",
        "CHEST",
        "PA",
    )
    shipped = load_settings(REPO / "config" / "dicomnode.toml", env={})
    assert [r.name for r in matching_rules(shipped.rules, chest)] == ["chest-radiograph"]
    limb = facts_from_dataset(pydicom.dcmread(pydicom_file("RG3_UNCR.dcm")))
    assert limb.body_part_examined == "EXTREMITY" and matching_rules(shipped.rules, limb) == []


def test_rule_matching_is_case_insensitive_and_empty_means_any() -> None:
    facts = InstanceFacts(sop_class_uid=CR, modality="cr", body_part_examined="Chest", view_position="PA")
    assert rule().matches(facts)
    assert rule(modalities=("CR", "DX"), body_parts=("CHEST",), view_positions=("pa",)).matches(facts)
    assert not rule(modalities=("DX",)).matches(facts)
    assert not rule(body_parts=("CHESTX",)).matches(facts)  # exact, not a prefix
    assert rule(sop_classes=(CR, DX_PRESENTATION)).matches(facts)
    assert not rule(sop_classes=(SC,)).matches(facts)


def test_missing_attribute_matches_only_empty_list_or_empty_string() -> None:
    facts = InstanceFacts(sop_class_uid=CR, modality="CR")  # no Body Part Examined, no View Position
    assert rule().matches(facts)
    assert rule(body_parts=("CHEST", "")).matches(facts)
    assert not rule(body_parts=("CHEST",)).matches(facts)
    assert not rule(view_positions=("PA",)).matches(facts)
    assert not rule(body_parts=("",)).matches(InstanceFacts(body_part_examined="CHEST"))


def test_matching_rules_keeps_order_and_skips_disabled() -> None:
    facts = InstanceFacts(sop_class_uid=CR, modality="CR", body_part_examined="CHEST")
    rules = [
        rule(name="b", modalities=("CR",)),
        rule(name="off", enabled=False),
        rule(name="dx", modalities=("DX",)),
        rule(name="a"),
    ]
    assert [r.name for r in matching_rules(rules, facts)] == ["b", "a"]


def test_rule_normalises_views() -> None:
    r = Rule(name="r", azimuths=[-90, 45.5], destinations=["pacs"])  # type: ignore[arg-type]
    assert r.azimuths == (-90.0, 45.5) and r.elevations == (0.0, 0.0) and r.destinations == ("pacs",)
    assert r.views == ((-90.0, 0.0), (45.5, 0.0))
    assert rule(azimuths=(30, 30), elevations=(10, -10)).views == ((30.0, 10.0), (30.0, -10.0))


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"azimuths": ()}, r"rules\[r\]\.azimuths: must name at least one"),
        ({"azimuths": (91,)}, r"rules\[r\]\.azimuths: each angle must be in \[-90, 90\] degrees, got 91"),
        ({"azimuths": (30, 30)}, r"rules\[r\]\.azimuths: duplicate view"),
        ({"azimuths": (True,)}, r"rules\[r\]\.azimuths: angles must be numbers"),
        ({"azimuths": "30"}, r"rules\[r\]\.azimuths: must be a list"),
        ({"elevations": (0, 0)}, r"rules\[r\]\.elevations: must be empty or have one value per azimuth"),
        ({"elevations": (-95,)}, r"rules\[r\]\.elevations: each angle"),
        ({"sop_classes": ("1.2.3.abc",)}, r"rules\[r\]\.sop_classes: '1\.2\.3\.abc' is not a valid UID"),
        ({"modalities": ("CR\\DX",)}, r"rules\[r\]\.modalities: 'CR\\\\DX' is not a single Code String"),
        ({"body_parts": "CHEST"}, r"rules\[r\]\.body_parts: must be a list of strings"),
        ({"view_positions": (1,)}, r"rules\[r\]\.view_positions: must be a list of strings"),
        ({"destinations": ("pacs", "pacs")}, r"rules\[r\]\.destinations: names a peer twice"),
        ({"enabled": "yes"}, r"rules\[r\]\.enabled: must be true or false"),
        ({"name": ""}, r"rules\[''\]\.name: must be a non-empty"),
    ],
)
def test_invalid_rules_name_the_rule(kw: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        rule(**kw)


def test_plain_radiograph_is_processed(tmp_path: Path) -> None:
    facts = facts_from_dataset(round_trip(radiograph(), tmp_path))
    assert loop_reason(facts, DEFAULT, {OUR_DEVICE_UID}, "dicomnode") is None


def test_synthetic_data_is_never_processed(tmp_path: Path) -> None:
    facts = facts_from_dataset(round_trip(radiograph(SyntheticData="YES"), tmp_path))
    for skip_derived in ("secondary", "all", "none"):
        lenient = LoopPreventionSettings(skip_derived=skip_derived, skip_own_device=False)
        assert loop_reason(facts, lenient, (), "") == "Synthetic Data (0008,001C) is YES"
    assert facts_from_dataset(radiograph(SyntheticData="NO")).synthetic_data is False


def test_our_device_uid_is_never_processed(tmp_path: Path) -> None:
    ds = radiograph()
    # Our Device UID is recognised in any Contributing Equipment item, whatever its purpose.
    ds.ContributingEquipmentSequence = [
        equipment("Other", generate_uid(), MODIFYING),
        equipment("X", OUR_DEVICE_UID, MODIFYING),
    ]
    facts = facts_from_dataset(round_trip(ds, tmp_path))
    assert loop_reason(facts, DEFAULT, [OUR_DEVICE_UID], "dicomnode") == (
        f"Contributing Equipment (0018,A001) names this node's Device UID {OUR_DEVICE_UID}"
    )
    assert loop_reason(facts, DEFAULT, [generate_uid()], "dicomnode") is None
    assert loop_reason(facts, LoopPreventionSettings(skip_own_device=False), [OUR_DEVICE_UID], "dicomnode") is None


def test_our_manufacturer_as_synthesizing_equipment_is_never_processed(tmp_path: Path) -> None:
    ds = radiograph()
    ds.ContributingEquipmentSequence = [equipment("DicomNode", generate_uid(), SYNTHESIZING)]
    facts = facts_from_dataset(round_trip(ds, tmp_path))
    assert facts.contributing_manufacturers == ("DicomNode",)
    reason = loop_reason(facts, DEFAULT, [OUR_DEVICE_UID], "dicomnode")
    assert reason is not None and "Synthesizing Equipment (109100)" in reason
    assert loop_reason(facts, DEFAULT, [OUR_DEVICE_UID], "someone else") is None
    # The same manufacturer in another role (e.g. it only modified the image) is not a loop.
    ds.ContributingEquipmentSequence = [equipment("dicomnode", None, MODIFYING)]
    assert loop_reason(facts_from_dataset(ds), DEFAULT, [OUR_DEVICE_UID], "dicomnode") is None


def test_derived_secondary_is_skipped_unless_none(tmp_path: Path) -> None:
    """Our own output and every Secondary Capture are DERIVED\\SECONDARY (PS3.3 C.7.6.1.1.2)."""
    facts = facts_from_dataset(round_trip(radiograph(ImageType=["DERIVED", "SECONDARY", "AXIAL"]), tmp_path))
    assert loop_reason(facts, DEFAULT, (), "dicomnode") == SECONDARY_REASON
    assert loop_reason(facts, ALL_DERIVED, (), "dicomnode") == ALL_REASON
    assert loop_reason(facts, NO_DERIVED, (), "dicomnode") is None


def test_derived_primary_is_skipped_only_under_all(tmp_path: Path) -> None:
    facts = facts_from_dataset(round_trip(radiograph(ImageType=["DERIVED", "PRIMARY"]), tmp_path))
    assert loop_reason(facts, DEFAULT, (), "dicomnode") is None
    assert loop_reason(facts, ALL_DERIVED, (), "dicomnode") == ALL_REASON
    assert loop_reason(facts, NO_DERIVED, (), "dicomnode") is None
    # Only values 1 and 2 count, in that order; a DERIVED with no value 2 is not SECONDARY.
    for image_type in (["ORIGINAL", "PRIMARY", "DERIVED"], ["ORIGINAL", "SECONDARY"], ["DERIVED"]):
        other = facts_from_dataset(radiograph(ImageType=image_type))
        assert loop_reason(other, DEFAULT, (), "dicomnode") is None, image_type
    assert loop_reason(facts_from_dataset(radiograph(ImageType="DERIVED")), ALL_DERIVED, (), "") == ALL_REASON


def test_synthetic_derived_secondary_names_synthetic_data(tmp_path: Path) -> None:
    """Synthetic Data is checked first, whatever skip_derived says (our own output carries both)."""
    ds = radiograph(ImageType=["DERIVED", "SECONDARY"], SyntheticData="YES")
    facts = facts_from_dataset(round_trip(ds, tmp_path))
    for flags in (DEFAULT, ALL_DERIVED, NO_DERIVED):
        assert loop_reason(facts, flags, (), "dicomnode") == "Synthetic Data (0008,001C) is YES"


def test_loop_reason_takes_whole_settings() -> None:
    shipped = load_settings(REPO / "config" / "dicomnode.toml", env={})
    assert shipped.loop_prevention.skip_derived == "secondary"
    secondary = InstanceFacts(image_type=("DERIVED", "SECONDARY"))
    assert loop_reason(secondary, shipped, (), shipped.output.manufacturer) == SECONDARY_REASON
    primary = InstanceFacts(image_type=("DERIVED", "PRIMARY"))
    assert loop_reason(primary, shipped, (), shipped.output.manufacturer) is None


def test_real_chest_cr_is_derived_primary_and_processed() -> None:
    """A real processed chest PA from a CR reader is DERIVED\\PRIMARY: processed unless skip_derived = "all"."""
    chest = facts_from_dataset(pydicom.dcmread(pydicom_file("RG1_UNCR.dcm")))
    assert chest.image_type[:2] == ("DERIVED", "PRIMARY")
    assert loop_reason(chest, DEFAULT, (), "dicomnode") is None
    assert loop_reason(chest, NO_DERIVED, (), "dicomnode") is None
    assert loop_reason(chest, ALL_DERIVED, (), "dicomnode") == ALL_REASON
