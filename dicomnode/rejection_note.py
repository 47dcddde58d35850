"""The writer of rejection notes: one Key Object Selection Document (KOS) that withdraws instances.

IHE Radiology TF Vol. 3, Imaging Object Change Management (IOCM): an instance that must no longer
be used is rejected by a KOS (PS3.3 A.35.4) in the same study whose Document Title is one of
CID 7011 (Rejected for Quality Reasons, Rejected for Patient Safety Reasons, ...), whose content
tree (TID 2010) references each rejected instance, and whose Current Requested Procedure Evidence
Sequence (0040,A375) lists exactly those instances. A receiver that implements IOCM hides or
deletes them; one that does not still holds a note a reader can find next to the images.

The note goes in a series of its own (Modality KO, Series Number ``series_number``, 990 unless
the site sets ``[output] recall_series_number``). Its Series and SOP Instance UIDs are derived
from the study, the reason and the set of rejected SOP Instance UIDs, so running the same recall
again gives the same note instead of a second, different one.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Sequence
from datetime import datetime
from typing import Literal

from highdicom.ko import KeyObjectSelection, KeyObjectSelectionDocument
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import DA, TM

from dicomnode.derived import uuid5_uid
from dicomnode.errors import DicomInputError

logger = logging.getLogger(__name__)

RecallReason = Literal["quality", "safety"]
# Document Titles of a rejection note, PS3.16 CID 7011 "Rejected for Quality Reasons" and
# "Rejected for Patient Safety Reasons" (both also in CID 7010), as IHE IOCM uses them.
REJECTION_TITLES: dict[str, Code] = {
    "quality": Code("113001", "DCM", "Rejected for Quality Reasons"),
    "safety": Code("113037", "DCM", "Rejected for Patient Safety Reasons"),
}
DEFAULT_SERIES_NUMBER = 990
_DESCRIPTION_MAX = 1024  # Text Value of a TEXT content item is UT, but keep it readable

# Patient and Study attributes highdicom reads from the first evidence item without a default.
_REQUIRED_BY_HIGHDICOM = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
)


def rejection_note_uids(study_instance_uid: str, reason: str, sop_instance_uids: Sequence[str]) -> tuple[str, str]:
    """(Series Instance UID, SOP Instance UID) of the note rejecting exactly this set, for this reason."""
    if reason not in REJECTION_TITLES:
        raise ValueError(f"reason {reason!r} is not one of {', '.join(REJECTION_TITLES)}")
    key = [str(study_instance_uid), reason, sorted(set(map(str, sop_instance_uids)))]
    return uuid5_uid(json.dumps(["rejection-series", *key])), uuid5_uid(json.dumps(["rejection-note", *key]))


def _evidence_head(first: Dataset) -> Dataset:
    """A pixel-less copy of `first` with every attribute highdicom reads directly present.

    Type 2 attributes a source may lack are given empty values here only; the verbatim Patient
    and Study modules are copied from `first` once the document is built.
    """
    head = Dataset()
    for element in first:
        if element.tag < 0x7FE00000:
            head.add(element)
    for keyword in _REQUIRED_BY_HIGHDICOM:
        if keyword not in head:
            setattr(head, keyword, None)
    return head


def build_rejection_note(
    rejected: Sequence[Dataset],
    reason: RecallReason,
    *,
    manufacturer: str,
    description: str,
    series_number: int = DEFAULT_SERIES_NUMBER,
    content_datetime: datetime | None = None,
) -> Dataset:
    """The IOCM rejection note for `rejected` (all of one study), ready to be stored and sent.

    `rejected` are the instances themselves (pixel data need not be loaded): their SOP Class,
    SOP Instance, Series and Study UIDs go into the evidence sequence and the content tree, and
    the Patient and Study modules are copied verbatim from the first of them. `description`
    becomes the Key Object Description (113012, DCM), e.g. why and by whom the recall was made.
    """
    if reason not in REJECTION_TITLES:
        raise DicomInputError(f"reason {reason!r} is not one of {', '.join(REJECTION_TITLES)}")
    if not rejected:
        raise DicomInputError("nothing to reject: a rejection note references at least one instance")
    if isinstance(series_number, bool) or not isinstance(series_number, int) or series_number < 1:
        raise DicomInputError(f"series_number {series_number!r} is not a positive integer")
    studies = {str(ds.get("StudyInstanceUID", "")) for ds in rejected}
    if len(studies) != 1 or "" in studies:
        raise DicomInputError(f"a rejection note covers one study; the instances name {sorted(studies)}")
    uids = [str(ds.SOPInstanceUID) for ds in rejected]
    if len(set(uids)) != len(uids):
        raise DicomInputError(f"instances to reject repeat a SOP Instance UID: {uids}")
    study_uid = studies.pop()
    series_uid, sop_uid = rejection_note_uids(study_uid, reason, uids)
    when = content_datetime or datetime.now()
    evidence = [_evidence_head(rejected[0]), *rejected[1:]]
    content = KeyObjectSelection(
        document_title=REJECTION_TITLES[reason],
        referenced_objects=evidence,
        description=description[:_DESCRIPTION_MAX] or None,
    )
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name")
            ds = KeyObjectSelectionDocument(
                evidence=evidence,
                content=content,
                series_instance_uid=series_uid,
                series_number=series_number,
                sop_instance_uid=sop_uid,
                instance_number=1,
                manufacturer=manufacturer,
                transfer_syntax_uid=ExplicitVRLittleEndian,
            )
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise DicomInputError(f"cannot build a rejection note for study {study_uid}: {e}") from e
    ds.copy_patient_and_study_information(rejected[0])
    ds.ContentDate = DA(when.date())
    ds.ContentTime = TM(when.time())
    ds.SeriesDate = DA(when.date())
    ds.SeriesTime = TM(when.time())
    title = REJECTION_TITLES[reason].meaning
    ds.SeriesDescription = f"REJECTED: {title}"[:64]
    logger.info("built rejection note %s (%s) for %d instances of one study", sop_uid, reason, len(rejected))
    return ds


def rejected_uids_of(note: Dataset) -> set[str]:
    """The SOP Instance UIDs a rejection note lists in its Current Requested Procedure Evidence Sequence."""
    return {
        str(instance.ReferencedSOPInstanceUID)
        for study in note.get("CurrentRequestedProcedureEvidenceSequence", [])
        for series in study.get("ReferencedSeriesSequence", [])
        for instance in series.get("ReferencedSOPSequence", [])
    }
