"""The rejection-note writer (IHE IOCM KOS): built from real derived instances, dciodvfy-clean, read back."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from dicomnode.derived import build_derived_instances
from dicomnode.errors import DicomInputError
from dicomnode.rejection_note import (
    REJECTION_TITLES,
    build_rejection_note,
    rejected_uids_of,
    rejection_note_uids,
)
from tests.test_derived import GENERATOR, STUDY_KEYWORDS, WHEN, dciodvfy_errors, full_cr_source, random_views

KOS_STORAGE = "1.2.840.10008.5.1.4.1.1.88.59"


def stored_views(folder: Path, count: int = 3, source_name: str = "source.dcm") -> list[Dataset]:
    """Derived views of a full CR source, written as files and read back without pixels."""
    source = full_cr_source(folder / source_name)
    views = [(-30.0 + 30.0 * i, 0.0) for i in range(count)]
    built = build_derived_instances(
        source, random_views(count, 12), 12, None, None, views, GENERATOR, 1, 2, 1.5, content_datetime=WHEN
    )
    read = []
    for index, ds in enumerate(built):
        path = folder / f"{source_name}.view{index}.dcm"
        ds.save_as(path, enforce_file_format=True)
        read.append(pydicom.dcmread(path, stop_before_pixels=True))
    return read


@pytest.mark.parametrize("reason", ["quality", "safety"])
def test_note_is_valid_and_lists_exactly_the_rejected_instances(tmp_path: Path, reason: str) -> None:
    views = stored_views(tmp_path)
    rejected = views[:2]
    note = build_rejection_note(rejected, reason, manufacturer="dicomnode", description="model withdrawn")
    path = tmp_path / "note.dcm"
    note.save_as(path, enforce_file_format=True)
    errors, output = dciodvfy_errors(path)
    assert not errors, output

    back = pydicom.dcmread(path)
    assert back.SOPClassUID == KOS_STORAGE and back.Modality == "KO"
    title = back.ConceptNameCodeSequence[0]
    code = REJECTION_TITLES[reason]
    assert (title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning) == (code.value, "DCM", code.meaning)
    assert rejected_uids_of(back) == {ds.SOPInstanceUID for ds in rejected}
    assert views[2].SOPInstanceUID not in rejected_uids_of(back)
    (study,) = back.CurrentRequestedProcedureEvidenceSequence
    assert study.StudyInstanceUID == rejected[0].StudyInstanceUID == back.StudyInstanceUID
    (series,) = study.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == rejected[0].SeriesInstanceUID
    assert back.SeriesInstanceUID not in (rejected[0].SeriesInstanceUID,) and back.SeriesNumber == 990
    # The content tree (TID 2010) references the same instances, each as an IMAGE item.
    referenced = {
        item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for item in back.ContentSequence
        if item.ValueType == "IMAGE"
    }
    assert referenced == rejected_uids_of(back)
    descriptions = [item.TextValue for item in back.ContentSequence if item.ValueType == "TEXT"]
    assert descriptions == ["model withdrawn"]
    for keyword in STUDY_KEYWORDS:
        assert back.get(keyword) == rejected[0].get(keyword), keyword


def test_uids_are_deterministic_in_set_and_reason(tmp_path: Path) -> None:
    views = stored_views(tmp_path)
    one = build_rejection_note(views, "quality", manufacturer="dicomnode", description="x")
    again = build_rejection_note(list(reversed(views)), "quality", manufacturer="dicomnode", description="y")
    assert (one.SOPInstanceUID, one.SeriesInstanceUID) == (again.SOPInstanceUID, again.SeriesInstanceUID)
    safety = build_rejection_note(views, "safety", manufacturer="dicomnode", description="x")
    fewer = build_rejection_note(views[:2], "quality", manufacturer="dicomnode", description="x")
    assert len({one.SOPInstanceUID, safety.SOPInstanceUID, fewer.SOPInstanceUID}) == 3
    study = views[0].StudyInstanceUID
    assert rejection_note_uids(study, "quality", [v.SOPInstanceUID for v in views]) == (
        one.SeriesInstanceUID,
        one.SOPInstanceUID,
    )


def test_a_note_covers_one_study_and_a_known_reason(tmp_path: Path) -> None:
    first = stored_views(tmp_path, 1, "a.dcm")
    second = stored_views(tmp_path, 1, "b.dcm")
    with pytest.raises(DicomInputError, match="one study"):
        build_rejection_note([*first, *second], "quality", manufacturer="dicomnode", description="x")
    with pytest.raises(DicomInputError, match="reason"):
        build_rejection_note(first, "boredom", manufacturer="dicomnode", description="x")  # type: ignore[arg-type]
    with pytest.raises(DicomInputError, match="at least one"):
        build_rejection_note([], "quality", manufacturer="dicomnode", description="x")
    with pytest.raises(DicomInputError, match="repeat"):
        build_rejection_note([*first, *first], "quality", manufacturer="dicomnode", description="x")


def test_a_source_without_type_2_patient_attributes_still_gets_a_note(tmp_path: Path) -> None:
    views = stored_views(tmp_path, 2)
    for ds in views:
        for keyword in ("PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID"):
            delattr(ds, keyword)
    note = build_rejection_note(views, "quality", manufacturer="dicomnode", description="x")
    path = tmp_path / "note.dcm"
    note.save_as(path, enforce_file_format=True)
    errors, output = dciodvfy_errors(path)
    assert not errors, output
    assert note.PatientID == views[0].PatientID
