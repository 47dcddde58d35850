"""The writer of derived (synthetic) instances: one Secondary Capture image per generated view.

/work/shared/dicom-conventions.md is the specification: same study as the source, a new series
with deterministic UIDs, every attribute that tells a PACS, a viewer and an auditor that the image
is synthetic (Synthetic Data, Conversion Type SYN, Contributing Equipment "Synthesizing
Equipment" with a Device UID for the exact weights, Derivation Description, Image Comments).

Where the view angles are kept, for machines and for people:
- Derivation Description (0008,2111) of each instance ends with ``azimuth_deg=<float>;
  elevation_deg=<float>; seed=...`` (read back with :func:`view_angles_of`);
- Image Comments (0020,4000) repeats the angles for people next to the warning;
- Series Description (0008,103E) names the range of angles of the whole series.

Patient Orientation (0020,0020) of a view, PS3.3 C.7.6.1.1.1 (see :func:`view_patient_orientation`):
the column direction keeps the source's second value (usually F); the row direction rotates
about the long axis with the azimuth, in the sense of the image the model sees: a positive
azimuth turns the row direction u toward u x c (c = column direction). For the usual head-up
display (column F) that is a right-handed rotation about the patient's head axis: L at 0, P at
+90, A at -90, R at 180; a PA viewed as if facing the patient turns toward a left lateral.
Obliques are written principal letter first ("LP" at +30, "PL" at +60). Elevation is not written
into the orientation. Where the source has no usable orientation the value stays empty (Type 2).
Pixel Spacing is never written: the generated view does not preserve the source's scale.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import numpy as np
from highdicom import ContributingEquipment
from highdicom.sc import SCImage
from pydicom.dataset import Dataset
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    JPEG2000MC,
    UID,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSNearLossless,
    MPEGTransferSyntaxes,
    SecondaryCaptureImageStorage,
)
from pydicom.valuerep import DA, DS, DT, TM

from dicomnode.derived_codes import (
    PROCESSING_ALGORITHM,
    PROJECT_UID_NAMESPACE,
    SOURCE_IMAGE_FOR_PROCESSING,
    SYNTHESIZING_EQUIPMENT,
    SYNTHETIC_VIEW_DERIVATION,
    code_item,
    coding_scheme_items,
)
from dicomnode.errors import ConfigError, DicomInputError, SynthesisError
from dicomnode.vr import (
    MAX_LENGTH,
    SERIES_DESCRIPTION_LABEL_MAX,
    SERIES_DESCRIPTION_PREFIX_MAX,
    code_string_problem,
    string_problem,
)
from synthesis.voi_window import body_window

logger = logging.getLogger(__name__)

# Transfer syntaxes whose encoding may have lost information (PS3.5 Section 8 and Annex A).
_LOSSY_STILL = {JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLSNearLossless, JPEG2000, JPEG2000MC, HTJ2K}
LOSSY_TRANSFER_SYNTAXES = frozenset(_LOSSY_STILL | set(MPEGTransferSyntaxes))
_MAX_UID_LENGTH = 64  # PS3.5 9.1
_LO_MAX = MAX_LENGTH["LO"]  # PS3.5 Table 6.2-1, Long String
_UID_VALUE = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")  # PS3.5 9.1
_HEX_IDENTITY = re.compile(r"[0-9a-f]{8,128}")
_ANGLES_TEXT = re.compile(r"azimuth_deg=(?P<az>[-+0-9.eE]+); elevation_deg=(?P<el>[-+0-9.eE]+);")
_WARNING = "Synthetic view, not an acquired image; not for diagnosis."


def uuid5_uid(name: str) -> str:
    """PS3.5 B.2: a UID from a UUID is "2.25." followed by the UUID as one decimal integer."""
    return f"2.25.{uuid.uuid5(PROJECT_UID_NAMESPACE, name).int}"


_uuid5_uid = uuid5_uid


def device_uid_for(model_identity: str) -> str:
    """Device UID (0018,1002) of the exact model weights: new weights, new UID."""
    return _uuid5_uid(model_identity)


def _canonical_views(views: Sequence[tuple[float, float]]) -> tuple[tuple[float, float], ...]:
    """(azimuth, elevation) in degrees as floats, checked: finite, in range, none repeated."""
    if len(views) == 0:
        raise SynthesisError("views is empty: at least one (azimuth, elevation) is needed")
    canonical: list[tuple[float, float]] = []
    for view in views:
        try:
            azimuth, elevation = (float(angle) + 0.0 for angle in view)  # + 0.0 turns -0.0 into 0.0
        except (TypeError, ValueError) as e:
            raise SynthesisError(f"view {view!r} is not an (azimuth, elevation) pair of numbers") from e
        if not (math.isfinite(azimuth) and -180.0 <= azimuth <= 180.0):
            raise SynthesisError(f"azimuth {azimuth!r} of view {view!r} is not within -180..180 degrees")
        if not (math.isfinite(elevation) and -90.0 <= elevation <= 90.0):
            raise SynthesisError(f"elevation {elevation!r} of view {view!r} is not within -90..90 degrees")
        azimuth = 180.0 if azimuth == -180.0 else azimuth  # one name for the view from behind
        if (azimuth, elevation) in canonical:
            raise SynthesisError(f"view {view!r} is repeated: each view gets its own SOP Instance UID")
        canonical.append((azimuth, elevation))
    return tuple(canonical)


@dataclass(frozen=True)
class DerivedUids:
    """The Series Instance UID and the SOP Instance UIDs (in view order) of one derived series."""

    series_instance_uid: str
    sop_instance_uids: tuple[str, ...]

    def __post_init__(self) -> None:
        all_uids = (self.series_instance_uid, *self.sop_instance_uids)
        for value in all_uids:
            if not (isinstance(value, str) and _UID_VALUE.fullmatch(value) and len(value) <= _MAX_UID_LENGTH):
                raise SynthesisError(f"{value!r} is not a valid UID of at most 64 characters")
        if not self.sop_instance_uids:
            raise SynthesisError("sop_instance_uids is empty: a series needs at least one instance")
        if len(set(all_uids)) != len(all_uids):
            raise SynthesisError(f"UIDs {all_uids!r} are not all different")


def derived_uids(
    source_sop_instance_uid: str,
    model_identity: str,
    views: Sequence[tuple[float, float]],
    seed: int,
    request_key: str = "",
) -> DerivedUids:
    """Deterministic UIDs for one request, so a re-received study or a retried job never
    duplicates a series in PACS (conventions, "Identity and idempotence").

    The series UID depends on the source, the weights, the whole view list, the seed and
    `request_key`; each instance UID on the same but only its own view. Sampling settings
    (steps, guidance) are not part of the identity: a caller that varies them for the same
    source and seed must put them into `request_key`.
    """
    canonical = _canonical_views(views)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise SynthesisError(f"seed {seed!r} is not an integer")
    common = [str(source_sop_instance_uid), str(model_identity), seed, str(request_key)]
    series_uid = _uuid5_uid(json.dumps(["series", *common, [list(v) for v in canonical]]))
    instance_uids = tuple(_uuid5_uid(json.dumps(["instance", *common, list(v)])) for v in canonical)
    return DerivedUids(series_instance_uid=series_uid, sop_instance_uids=instance_uids)


def _check_lo(field: str, value: object) -> None:
    """PS3.5 Table 6.2-1 Long String, as :mod:`dicomnode.vr` (and so the configuration) checks it."""
    problem = string_problem(value, "LO")
    if problem:
        raise ConfigError(f"{field} {value!r} is not a DICOM Long String: {problem}")


@dataclass(frozen=True, kw_only=True)
class GeneratorInfo:
    """Who generated the pixels: written into Contributing Equipment and General Equipment.

    `model_identity` is the hex digest of the exact weights; it decides the Device UID.
    """

    manufacturer: str = "dicomnode"
    model_name: str
    model_version: str
    model_identity: str
    node_version: str
    institution_name: str | None = None

    def __post_init__(self) -> None:
        for field in ("manufacturer", "model_name", "model_version", "node_version"):
            _check_lo(field, getattr(self, field))
        if self.institution_name is not None:
            _check_lo("institution_name", self.institution_name)
        if not isinstance(self.model_identity, str) or not _HEX_IDENTITY.fullmatch(self.model_identity):
            raise ConfigError(f"model_identity {self.model_identity!r} is not a lower-case hex digest")

    @property
    def device_uid(self) -> str:
        """Device UID (0018,1002) of these weights."""
        return device_uid_for(self.model_identity)


def is_lossy_source(ds: Dataset) -> bool:
    """True when the source's pixels went through lossy compression (PS3.3 C.7.6.1.1.5).

    Either the instance says so (Lossy Image Compression "01") or it arrived in a lossy
    transfer syntax; the flag is inherited by everything derived from it.
    """
    if str(ds.get("LossyImageCompression", "")).strip() == "01":
        return True
    file_meta = getattr(ds, "file_meta", None)
    transfer_syntax = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    return transfer_syntax is not None and UID(transfer_syntax) in LOSSY_TRANSFER_SYNTAXES


Orientation = tuple[str, str]  # Patient Orientation: (row direction, column direction)
_IN_PATIENT = {"L": (1.0, 0.0), "R": (-1.0, 0.0), "P": (0.0, 1.0), "A": (0.0, -1.0)}
_OBLIQUE_TOLERANCE = math.sin(math.radians(0.5))  # below this a secondary letter is noise


def view_patient_orientation(source_orientation: Sequence[str] | None, azimuth: float) -> Orientation | None:
    """Patient Orientation of a view at `azimuth` degrees, or None when it cannot be told.

    The convention is described in the module docstring. It needs a source whose column
    direction is the long axis (H or F) and whose row direction lies in the transverse plane
    (letters among L, R, A, P; a two-letter value is read as a 45 degree oblique).
    """
    if isinstance(source_orientation, str):  # a malformed single-valued element
        source_orientation = source_orientation.split("\\")
    values = [str(value).strip().upper() for value in (source_orientation or [])]
    if len(values) != 2 or values[1] not in ("H", "F") or not values[0] or set(values[0]) - set(_IN_PATIENT):
        return None
    row, column = values
    if azimuth == 0:
        return row, column
    x = sum(_IN_PATIENT[letter][0] for letter in row)
    y = sum(_IN_PATIENT[letter][1] for letter in row)
    norm = math.hypot(x, y)
    if norm == 0:
        return None
    x, y = x / norm, y / norm
    s = 1.0 if column == "H" else -1.0  # u x c for u = (x, y, 0), c = (0, 0, s) is (s*y, -s*x, 0)
    theta = math.radians(azimuth)
    rx = x * math.cos(theta) + s * y * math.sin(theta)
    ry = y * math.cos(theta) - s * x * math.sin(theta)
    parts = [(abs(rx), "L" if rx > 0 else "R", 0), (abs(ry), "P" if ry > 0 else "A", 1)]
    parts.sort(key=lambda part: (-round(part[0], 9), part[2]))
    return "".join(letter for size, letter, _ in parts if size > _OBLIQUE_TOLERANCE), column


def window_for(pixel_array: np.ndarray) -> tuple[float, float]:
    """Window Center/Width (PS3.3 C.11.2.1.2.1, LINEAR) from the image's body: its 10th..99th
    percentile above the background, the rule of :func:`synthesis.voi_window.body_window`."""
    return body_window(pixel_array)


def series_description_for(prefix: str, views: Sequence[tuple[float, float]]) -> str:
    """Series Description naming SYNTHETIC/AI and the angles, at most 64 characters (LO)."""
    canonical = _canonical_views(views)

    def span(values: list[float]) -> str:
        low, high = min(values), max(values)
        return f"{low:g}" if low == high else f"{low:g}..{high:g}"

    def label(values: list[tuple[float, float]]) -> str:
        elevations = [elevation for _, elevation in values]
        text = f" AI {'view' if len(canonical) == 1 else 'views'} az {span([a for a, _ in values])}"
        if any(elevations):
            text += f" el {span(elevations)}"
        if len(canonical) > 1:
            text += f" ({len(canonical)})"
        return text

    text = label(canonical)
    if len(text) > SERIES_DESCRIPTION_LABEL_MAX:  # whole degrees always fit (vr.SERIES_DESCRIPTION_LABEL_MAX)
        text = label([(round(a) + 0.0, round(e) + 0.0) for a, e in canonical])
    return (prefix + text)[:_LO_MAX]


def view_angles_of(ds: Dataset) -> tuple[float, float] | None:
    """(azimuth, elevation) of a derived instance, read back from its Derivation Description."""
    found = _ANGLES_TEXT.search(str(ds.get("DerivationDescription", "")))
    return (float(found["az"]), float(found["el"])) if found else None


def _source_reference(source: Dataset) -> Dataset:
    """A deep copy of the source's attributes, without pixels, to build one instance from.

    Its SOP Class is set to Secondary Capture: the Patient and Study modules are the same in
    every image IOD, so reading them through the SC module table copies the same attributes and
    also works for SOP Classes highdicom does not know. Values that highdicom's constructor
    refuses (a Patient's Sex outside M/F/O, malformed dates) are dropped here only; the
    verbatim values are copied back afterwards with the rest of the Patient and Study modules.
    """
    ref = Dataset()
    for element in source:
        if element.tag < 0x7FE00000:
            ref.add(copy.deepcopy(element))
    ref.SOPClassUID = SecondaryCaptureImageStorage
    if ref.get("PatientSex") not in (None, "", "M", "F", "O"):
        del ref.PatientSex
    for keyword, parse in (("PatientBirthDate", DA), ("StudyDate", DA), ("StudyTime", TM)):
        try:
            parse(ref.get(keyword) or None)
        except (TypeError, ValueError):
            delattr(ref, keyword)
    return ref


def _check_source(source: Dataset) -> None:
    for keyword in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"):
        if not str(source.get(keyword, "")).strip():
            raise DicomInputError(f"source {source.get('SOPInstanceUID')!r} has no {keyword}")


def _check_pixels(pixels: Sequence[np.ndarray], count: int, bits_stored: int) -> None:
    if isinstance(bits_stored, bool) or not isinstance(bits_stored, int) or not 8 <= bits_stored <= 16:
        raise SynthesisError(f"bits_stored {bits_stored!r} is not within 8..16")
    if len(pixels) != count:
        raise SynthesisError(f"{len(pixels)} pixel arrays for {count} views")
    for index, array in enumerate(pixels):
        well_typed = isinstance(array, np.ndarray) and array.dtype == np.uint16
        if not (well_typed and array.ndim == 2 and 0 not in array.shape):
            described = (getattr(array, "dtype", type(array)), getattr(array, "shape", None))
            raise SynthesisError(f"pixels[{index}] {described!r} is not a non-empty 2-D uint16 array")
        peak = int(array.max())
        if peak >= 1 << bits_stored:
            raise SynthesisError(f"pixels[{index}] holds {peak}, beyond bits_stored {bits_stored}")


def _windows(
    pixels: Sequence[np.ndarray], centers: Sequence[float] | None, widths: Sequence[float] | None
) -> list[tuple[float, float]]:
    if centers is None or widths is None:
        return [window_for(array) for array in pixels]
    if len(centers) != len(pixels) or len(widths) != len(pixels):
        raise SynthesisError(f"{len(centers)} window centers, {len(widths)} widths for {len(pixels)} images")
    for center, width in zip(centers, widths, strict=True):
        if not (math.isfinite(center) and math.isfinite(width) and width >= 1):  # PS3.3 C.11.2.1.2.1
            raise SynthesisError(f"window center {center!r} / width {width!r}: need finite, width >= 1")
    return [(float(c), float(w)) for c, w in zip(centers, widths, strict=True)]


def _synthesizing_item(generator: GeneratorInfo, when: datetime) -> Dataset:
    item = ContributingEquipment(
        manufacturer=generator.manufacturer,
        purpose_of_reference=SYNTHESIZING_EQUIPMENT,
        manufacturer_model_name=generator.model_name,
        software_versions=[generator.model_version, generator.node_version],
        institution_name=generator.institution_name,
        contribution_datetime=DT(when),
        contribution_description=f"{generator.model_name} {generator.model_version} generated this view",
    )
    item.DeviceUID = generator.device_uid
    return item


def _processing_algorithm_item(generator: GeneratorInfo, when: datetime) -> Dataset:
    """The item IHE AI Results readers look for (purpose Newcode1, 99IHE)."""
    item = Dataset()
    item.PurposeOfReferenceCodeSequence = [code_item(PROCESSING_ALGORITHM)]
    item.Manufacturer = generator.manufacturer
    item.ManufacturerModelName = generator.model_name
    item.SoftwareVersions = generator.model_version
    item.DeviceUID = generator.device_uid
    item.ContributionDateTime = DT(when)
    item.ContributionDescription = "View-synthesis algorithm"
    return item


def _references(source: Dataset) -> tuple[Dataset, Dataset]:
    """Source Image Sequence item (PS3.3 C.7.6.1) and Referenced Series item (C.12.2)."""
    source_image = Dataset()
    source_image.ReferencedSOPClassUID = source.SOPClassUID
    source_image.ReferencedSOPInstanceUID = source.SOPInstanceUID
    source_image.PurposeOfReferenceCodeSequence = [code_item(SOURCE_IMAGE_FOR_PROCESSING)]
    instance = Dataset()
    instance.ReferencedSOPClassUID = source.SOPClassUID
    instance.ReferencedSOPInstanceUID = source.SOPInstanceUID
    series = Dataset()
    series.SeriesInstanceUID = source.SeriesInstanceUID
    series.ReferencedInstanceSequence = [instance]
    return source_image, series


def _derivation_description(
    generator: GeneratorInfo, view: tuple[float, float], seed: int, steps: int, guidance_scale: float
) -> str:
    """Derivation Description (ST, at most 1024 characters) with machine-readable angles."""
    azimuth, elevation = view
    return (
        f"{_WARNING} Generated by {generator.model_name} {generator.model_version} "
        f"(node {generator.node_version}) from the source image. azimuth_deg={azimuth!r}; "
        f"elevation_deg={elevation!r}; seed={seed}; steps={steps}; guidance_scale={guidance_scale!r}; "
        f"weights={generator.model_identity}"
    )


def build_derived_instances(
    source: Dataset,
    pixels: Sequence[np.ndarray],
    bits_stored: int,
    window_centers: Sequence[float] | None,
    window_widths: Sequence[float] | None,
    views: Sequence[tuple[float, float]],
    generator: GeneratorInfo,
    seed: int,
    steps: int,
    guidance_scale: float,
    series_number: int = 901,
    series_description_prefix: str = "SYNTHETIC",
    modality: str = "OT",
    source_lossy: bool = False,
    request_key: str = "",
    content_datetime: datetime | None = None,
) -> list[Dataset]:
    """One Secondary Capture Image (PS3.3 A.8.1) per view, in the source's study, new series.

    `pixels[i]` is the MONOCHROME2 image of `views[i]` (azimuth, elevation in degrees);
    `window_centers`/`window_widths` None means each image's window spans its body (:func:`window_for`). The
    returned datasets are complete: they can be written with ``save_as(..., enforce_file_format=True)``.
    """
    _check_source(source)
    canonical = _canonical_views(views)
    _check_pixels(pixels, len(canonical), bits_stored)
    windows = _windows(pixels, window_centers, window_widths)
    if isinstance(series_number, bool) or not isinstance(series_number, int) or series_number < 1:
        raise SynthesisError(f"series_number {series_number!r} is not a positive integer")
    prefix = series_description_prefix
    problem = string_problem(prefix, "LO", SERIES_DESCRIPTION_PREFIX_MAX)
    if problem:
        raise SynthesisError(f"series_description_prefix {prefix!r} {problem}")
    if code_string_problem(modality):
        raise SynthesisError(f"modality {modality!r} is not a DICOM Code String")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise SynthesisError(f"steps {steps!r} is not a positive integer")
    if not math.isfinite(guidance_scale):
        raise SynthesisError(f"guidance_scale {guidance_scale!r} is not finite")

    uids = derived_uids(source.SOPInstanceUID, generator.model_identity, canonical, seed, request_key)
    when = content_datetime or datetime.now()
    description = series_description_for(prefix, canonical)
    lossy = source_lossy or is_lossy_source(source)
    laterality = str(source.get("Laterality") or source.get("ImageLaterality") or "").strip()

    instances: list[Dataset] = []
    for number, (view, array, (center, width)) in enumerate(zip(canonical, pixels, windows, strict=True), 1):
        ref = _source_reference(source)
        try:
            with warnings.catch_warnings():
                # Names are copied verbatim from the source; highdicom's doubt about
                # single-component names is no reason to alter or refuse them.
                warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name")
                ds = SCImage.from_ref_dataset(
                    ref,
                    pixel_array=array,
                    photometric_interpretation="MONOCHROME2",
                    bits_allocated=16,
                    coordinate_system="PATIENT",
                    series_instance_uid=uids.series_instance_uid,
                    series_number=series_number,
                    sop_instance_uid=uids.sop_instance_uids[number - 1],
                    instance_number=number,
                    manufacturer=generator.manufacturer,
                    # highdicom accepts single letters only; the real value is set below.
                    patient_orientation=("L", "F"),
                    laterality=laterality if laterality in ("R", "L") else None,
                    transfer_syntax_uid=ExplicitVRLittleEndian,
                    series_description=description,
                    manufacturer_model_name=generator.model_name,
                    software_versions=[generator.model_version, generator.node_version],
                    institution_name=generator.institution_name,
                    content_date=when.date(),
                    content_time=when.time(),
                    series_date=when.date(),
                    series_time=when.time(),
                )
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise DicomInputError(f"cannot build an SC image from source {source.SOPInstanceUID}: {e}") from e
        ds.copy_patient_and_study_information(ref)

        # Image Pixel (PS3.3 C.7.6.3): the engine's values use bits_stored of the 16 allocated.
        ds.BitsStored = bits_stored
        ds.HighBit = bits_stored - 1
        # SC Equipment and SC Image (PS3.3 C.8.6.1, C.8.6.2).
        ds.ConversionType = "SYN"
        ds.SecondaryCaptureDeviceManufacturer = generator.manufacturer
        ds.SecondaryCaptureDeviceManufacturerModelName = generator.model_name
        ds.SecondaryCaptureDeviceSoftwareVersions = [generator.model_version, generator.node_version]
        ds.DateOfSecondaryCapture = DA(when.date())
        ds.TimeOfSecondaryCapture = TM(when.time())
        # General Image, General Series, SOP Common.
        ds.SyntheticData = "YES"
        ds.Modality = modality
        if source.get("BodyPartExamined"):
            ds.BodyPartExamined = source.BodyPartExamined
        orientation = view_patient_orientation(source.get("PatientOrientation"), view[0])
        ds.PatientOrientation = list(orientation) if orientation else []  # Type 2: empty if unknown
        ds.ImageComments = (
            f"SYNTHETIC AI-GENERATED VIEW (azimuth {view[0]:g} deg, elevation {view[1]:g} deg). {_WARNING}"
        )
        ds.BurnedInAnnotation = "NO"
        ds.RecognizableVisualFeatures = "NO"
        source_image, referenced_series = _references(source)
        ds.SourceImageSequence = [source_image]
        ds.ReferencedSeriesSequence = [referenced_series]
        ds.DerivationDescription = _derivation_description(generator, view, seed, steps, guidance_scale)
        ds.DerivationCodeSequence = [code_item(SYNTHETIC_VIEW_DERIVATION)]
        ds.CodingSchemeIdentificationSequence = coding_scheme_items()
        # highdicom's items (source acquisition, highdicom itself) stay; ours follow.
        equipment: list[Dataset] = [*ds.ContributingEquipmentSequence]
        equipment += [_synthesizing_item(generator, when), _processing_algorithm_item(generator, when)]
        ds.add_new(0x0018A001, "SQ", equipment)  # Contributing Equipment Sequence, PS3.3 C.12.1
        if lossy:
            ds.LossyImageCompression = "01"
            for keyword in ("LossyImageCompressionRatio", "LossyImageCompressionMethod"):
                if keyword in source:
                    ds.add(copy.deepcopy(source[keyword]))
        # VOI LUT (PS3.3 C.11.2): open with the output's own contrast.
        ds.WindowCenter = DS(center, auto_format=True)
        ds.WindowWidth = DS(width, auto_format=True)
        ds.WindowCenterWidthExplanation = "SYNTHETIC"
        instances.append(ds)

    logger.info(
        "built %d synthetic instances, series %s, from source %s (device %s)",
        len(instances),
        uids.series_instance_uid,
        source.SOPInstanceUID,
        generator.device_uid,
    )
    return instances
