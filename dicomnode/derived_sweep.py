"""The rotation sweep: all views of one request as the frames of one cine object a PACS viewer plays.

A Multi-frame Grayscale Word Secondary Capture Image (PS3.3 A.8.4, SOP Class
1.2.840.10008.5.1.4.1.1.7.3) built with pydicom from the single views
:func:`dicomnode.derived.build_derived_instances` made, so it carries the same markings they do
(Synthetic Data YES, Conversion Type SYN, Contributing Equipment with the 109100 item and the
weights' Device UID, IHE "Processing Algorithm" item, source references, Derivation Code, Image
Comments warning, Patient and Study modules), taken from them rather than written a second time.

Frames are the views ordered by azimuth, then elevation. For a viewer: Cine (C.7.6.5) Frame Time,
Cine Rate and Recommended Display Frame Rate, and Frame Increment Pointer -> Frame Time (the SC
Multi-frame Image module, C.8.6.3). For people: Frame Label Vector (0018,2002, SC Multi-frame
Vector module C.8.6.4) names each frame's angle ("az -30", "az 30 el 10"), and Image Comments lists
them all. For machines: Derivation Description has ``frame_azimuths_deg=[...]; frame_elevations_deg=[...];``.

The sweep is a series of its own in the same study (``[output] sweep_series_number``, 902 by
default), with UIDs derived from the single views' UIDs, so a retried job makes the same object.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from collections.abc import Sequence

import numpy as np
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import UID, ExplicitVRLittleEndian, MultiFrameGrayscaleWordSecondaryCaptureImageStorage
from pydicom.valuerep import DS, IS

from dicomnode.derived import series_description_for, uuid5_uid, view_angles_of, window_for
from dicomnode.errors import SynthesisError

logger = logging.getLogger(__name__)

DEFAULT_FRAME_TIME_MS = 250.0  # 4 frames per second: a few views turn slowly enough to follow
DEFAULT_SERIES_NUMBER = 902
_SH_MAX = 16  # PS3.5 Table 6.2-1, Short String: each Frame Label Vector value
_ST_MAX = 1024
_ANGLES_TEXT = re.compile(r"azimuth_deg=[^;]*; elevation_deg=[^;]*;")
_WARNING = "Synthetic view, not an acquired image; not for diagnosis."

# Attributes of a single view that describe that one frame and not the sweep.
_PER_VIEW = (
    "PatientOrientation",
    "ImageComments",
    "DerivationDescription",
    "WindowCenter",
    "WindowWidth",
    "WindowCenterWidthExplanation",
    "PixelData",
    "InstanceNumber",
)


def frame_label(azimuth: float, elevation: float) -> str:
    """A Frame Label Vector value (SH, at most 16 characters) naming one view's angles in degrees."""
    for digits in (None, 2, 1, 0):
        az = f"{azimuth:g}" if digits is None else f"{round(azimuth, digits):g}"
        el = f"{elevation:g}" if digits is None else f"{round(elevation, digits):g}"
        label = f"az {az}" if elevation == 0 else f"az {az} el {el}"
        if len(label) <= _SH_MAX:
            return label
    return f"{azimuth:.0f}/{elevation:.0f}"[:_SH_MAX]


def sweep_uids(view_sop_instance_uids: Sequence[str]) -> tuple[str, str]:
    """(Series Instance UID, SOP Instance UID) of the sweep made of exactly these single views."""
    key = json.dumps(sorted(map(str, view_sop_instance_uids)))
    return uuid5_uid(f'["sweep-series", {key}]'), uuid5_uid(f'["sweep-instance", {key}]')


def _frames(views: Sequence[Dataset]) -> list[tuple[tuple[float, float], Dataset]]:
    if len(views) < 2:
        raise SynthesisError(f"a sweep needs at least two views, got {len(views)}")
    framed: list[tuple[tuple[float, float], Dataset]] = []
    for ds in views:
        angles = view_angles_of(ds)
        if angles is None:
            raise SynthesisError(f"view {ds.get('SOPInstanceUID')} has no angles in its Derivation Description")
        framed.append((angles, ds))
    framed.sort(key=lambda item: item[0])
    first = framed[0][1]
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "Rows", "Columns", "BitsStored"):
        values = {str(ds.get(keyword)) for _, ds in framed}
        if len(values) != 1:
            raise SynthesisError(f"views of one sweep differ in {keyword}: {sorted(values)}")
    if first.get("PhotometricInterpretation") != "MONOCHROME2" or first.get("BitsAllocated") != 16:
        raise SynthesisError("a Grayscale Word sweep needs 16-bit MONOCHROME2 views")
    return framed


def _window(framed: Sequence[tuple[tuple[float, float], Dataset]], arrays: Sequence[np.ndarray]) -> tuple[float, float]:
    """One window spanning every frame's own window (PS3.3 C.11.2.1.2.1, linear)."""
    lows, highs = [], []
    for (_, ds), array in zip(framed, arrays, strict=True):
        if "WindowCenter" in ds and "WindowWidth" in ds:
            center, width = float(ds.WindowCenter), float(ds.WindowWidth)
        else:
            center, width = window_for(array)
        # C.11.2.1.2.1: the window maps [center - 0.5 - (width-1)/2, center - 0.5 + (width-1)/2].
        lows.append(center - 0.5 - (width - 1) / 2)
        highs.append(center - 0.5 + (width - 1) / 2)
    low, high = min(lows), max(highs)
    return (low + high + 1.0) / 2.0, high - low + 1.0


def _derivation(first: Dataset, angles: Sequence[tuple[float, float]]) -> str:
    azimuths = [a for a, _ in angles]
    elevations = [e for _, e in angles]
    frames = f"frame_azimuths_deg={azimuths!r}; frame_elevations_deg={elevations!r};"
    base = str(first.get("DerivationDescription", _WARNING))
    text = _ANGLES_TEXT.sub(frames, base, count=1) if _ANGLES_TEXT.search(base) else f"{base} {frames}"
    text = text.replace("generated this view", "generated these views")
    if len(text) > _ST_MAX:
        text = f"{_WARNING} Rotation sweep of {len(angles)} synthetic views. {frames}"[:_ST_MAX]
    return text


def build_sweep_instance(
    views: Sequence[Dataset],
    *,
    series_number: int = DEFAULT_SERIES_NUMBER,
    series_description_prefix: str = "SYNTHETIC",
    frame_time_ms: float = DEFAULT_FRAME_TIME_MS,
) -> Dataset:
    """One Multi-frame Grayscale Word SC holding `views` (single-view derived instances) as frames.

    `views` are the datasets of one request as built by ``build_derived_instances`` (with their
    pixels); the result is complete and can be written with ``save_as(..., enforce_file_format=True)``.
    """
    if isinstance(series_number, bool) or not isinstance(series_number, int) or series_number < 1:
        raise SynthesisError(f"series_number {series_number!r} is not a positive integer")
    if not (isinstance(frame_time_ms, int | float) and 0 < frame_time_ms <= 60_000):
        raise SynthesisError(f"frame_time_ms {frame_time_ms!r} is not within (0, 60000] ms")
    framed = _frames(views)
    angles = [a for a, _ in framed]
    arrays = [np.asarray(ds.pixel_array, dtype=np.uint16) for _, ds in framed]
    first = framed[0][1]
    series_uid, sop_uid = sweep_uids([ds.SOPInstanceUID for _, ds in framed])

    ds = Dataset()
    for element in first:
        if element.keyword not in _PER_VIEW and element.tag < 0x7FE00000:
            ds.add(copy.deepcopy(element))
    ds.file_meta = copy.deepcopy(first.file_meta)
    ds.file_meta.MediaStorageSOPClassUID = MultiFrameGrayscaleWordSecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = MultiFrameGrayscaleWordSecondaryCaptureImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.InstanceNumber = 1
    description = series_description_for(series_description_prefix, angles)
    ds.SeriesDescription = description.replace(" AI views ", " AI sweep ", 1)
    ds.PatientOrientation = []  # Type 2: the orientation changes from frame to frame
    # Image Pixel (C.7.6.3) and Multi-frame (C.7.6.6).
    bits_stored = max(int(first.BitsStored), 9)  # Grayscale Word: 9 to 16 bits stored (C.8.6.3)
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.NumberOfFrames = len(arrays)
    ds.PixelData = np.stack(arrays).astype("<u2").tobytes()
    # Cine (C.7.6.5): the viewer plays the frames at this pace.
    ds.FrameTime = DS(frame_time_ms, auto_format=True)
    ds.CineRate = IS(max(1, round(1000.0 / frame_time_ms)))
    ds.RecommendedDisplayFrameRate = IS(max(1, round(1000.0 / frame_time_ms)))
    ds.FrameIncrementPointer = [Tag("FrameTime"), Tag("FrameLabelVector")]
    # SC Multi-frame Vector (C.8.6.4): each frame's angles, for people.
    ds.FrameLabelVector = [frame_label(az, el) for az, el in angles]
    # SC Multi-frame Image (C.8.6.3): Type 1 and 1C for MONOCHROME2 word images.
    ds.BurnedInAnnotation = "NO"
    ds.RecognizableVisualFeatures = "NO"
    ds.PresentationLUTShape = "IDENTITY"
    ds.RescaleIntercept = DS(0)
    ds.RescaleSlope = DS(1)
    ds.RescaleType = "US"
    # VOI LUT (C.11.2): one window over all frames.
    center, width = _window(framed, arrays)
    ds.WindowCenter = DS(center, auto_format=True)
    ds.WindowWidth = DS(width, auto_format=True)
    ds.WindowCenterWidthExplanation = "SYNTHETIC"
    listed = ", ".join(frame_label(az, el).removeprefix("az ") for az, el in angles)
    ds.ImageComments = f"SYNTHETIC AI-GENERATED ROTATION SWEEP, {len(arrays)} frames (az deg): {listed}. {_WARNING}"
    ds.DerivationDescription = _derivation(first, angles)
    logger.info("built sweep %s of %d frames from series %s", sop_uid, len(arrays), first.SeriesInstanceUID)
    return ds
