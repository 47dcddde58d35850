"""Real radiographs into the engine, and synthetic views back into pixel data.

The model was trained on per-image min-max normalised PA DRRs: float images in [0, 1], bone bright,
black around the body. A received radiograph is turned into that shape by doing what a viewer does to
display it (PS3.4 N.2.1, the grayscale rendering pipeline):

1. decode the stored values with pydicom's pixel handlers (any transfer syntax a plugin decodes);
2. the Modality LUT (Rescale Slope/Intercept or Modality LUT Sequence, PS3.3 C.11.1);
3. the VOI transform (PS3.3 C.11.2): the first VOI LUT Sequence item if there is one, else the *first*
   Window Center/Width pair with its VOI LUT Function; when neither exists, or they are unusable, the
   0.5th..99.5th percentile range of the image is stretched to [0, 1] (robust to hot pixels and
   burned-in markers that a min-max stretch would let dominate);
4. MONOCHROME1 is inverted after the VOI transform, as a viewer displays it, so bone is bright;
5. Pixel Padding Value areas (PS3.3 C.7.5.1.1.2) become black.

Pad and background policy: a non-square image is padded to a square, centred, never stretched. The pad
value is the minimum of the displayed image -- black (0.0) whenever the window clips anything, as in
nearly every radiograph -- because black is what min-max normalised DRRs have around the body. The
resize to the model resolution R uses an antialiased Lanczos filter. It is done as "scale with the
aspect kept so the long side is R, then centre on an R x R canvas of the pad value", which is padding
then resizing except that the source's edges fall on whole model pixels: no output pixel mixes image
and pad, and :func:`restore_views` crops back exactly the region the source occupies. Where the source
sat is recorded in a :class:`Placement`.

Output size: :func:`restore_views` crops each view back to the source's aspect ratio at model scale,
so the long side of a restored view is exactly R and the short side is the source's short side scaled
by the same factor (rounded). Views are never upsampled to the source's size: that would invent detail
the model did not produce (and Pixel Spacing must then be left out of derived instances). Restored
pixels are MONOCHROME2 (bone bright), 12 bits stored in uint16 (0..4095), each with a window from its
own body's robust percentiles (:func:`synthesis.voi_window.body_window`: 10th..99th percentile of the
pixels above the black background), so it opens with the contrast a radiograph is read at rather than
washed out by a window over the whole range.

Everything this module refuses raises :class:`dicomnode.errors.SynthesisError` naming the reason.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import pydicom
from PIL import Image
from pydicom import uid
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_voi, get_decoder

from dicomnode.errors import SynthesisError
from synthesis.voi_window import body_window

logger = logging.getLogger(__name__)

__all__ = [
    "ACCEPTED_SOP_CLASSES",
    "MIN_SIDE",
    "OUTPUT_BITS_STORED",
    "Placement",
    "PreparedRadiograph",
    "RestoredViews",
    "display_pixels",
    "is_lossy",
    "prepare_radiograph",
    "restore_views",
]

#: Smallest accepted Rows or Columns: below this there is no radiograph to synthesise from.
MIN_SIDE = 64
#: Bits Stored of restored views (uint16 samples 0..4095).
OUTPUT_BITS_STORED = 12

#: Storage SOP Classes whose single-frame grayscale images the engine takes as input.
ACCEPTED_SOP_CLASSES: frozenset[str] = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography Image Storage
        "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image Storage - For Presentation
        "1.2.840.10008.5.1.4.1.1.1.1.1",  # Digital X-Ray Image Storage - For Processing
        "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage
        "1.2.840.10008.5.1.4.1.1.7.2",  # Multi-frame Grayscale Byte SC (one frame)
        "1.2.840.10008.5.1.4.1.1.7.3",  # Multi-frame Grayscale Word SC (one frame)
    }
)

# Compressed transfer syntaxes that are lossless by definition (PS3.5 A.4). Every other compressed one
# is treated as lossy: JPEG 2000 (.91) and HTJ2K (.203) permit either, and a reversible wavelet does not
# prove losslessness (quality layers may have been dropped), so we never claim lossless when unsure.
_LOSSLESS_COMPRESSED: frozenset[str] = frozenset(
    {
        uid.DeflatedExplicitVRLittleEndian,
        uid.RLELossless,
        uid.JPEGLossless,  # Process 14
        "1.2.840.10008.1.2.4.58",  # Process 15 (retired)
        "1.2.840.10008.1.2.4.65",  # Process 28 (retired)
        "1.2.840.10008.1.2.4.66",  # Process 29 (retired)
        uid.JPEGLosslessSV1,
        uid.JPEGLSLossless,
        uid.JPEG2000Lossless,
        uid.JPEG2000MCLossless,
        uid.HTJ2KLossless,
        uid.HTJ2KLosslessRPCL,
    }
)

_PERCENTILES = (0.5, 99.5)
_OUTPUT_MAX = 2**OUTPUT_BITS_STORED - 1


@dataclass(frozen=True)
class Placement:
    """Where the source image sits inside the padded square, and the model resolution it went to.

    ``Rows``/``Columns`` are the source's; ``side`` is the square's side (the long one); ``top`` and
    ``left`` are the source's offsets in the square, in source pixels.
    """

    Rows: int
    Columns: int
    side: int
    top: int
    left: int
    resolution: int

    def __post_init__(self) -> None:
        for name in ("Rows", "Columns", "side", "resolution"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SynthesisError(f"Placement.{name} must be a positive int, got {value!r}")
        if self.side != max(self.Rows, self.Columns):
            shape = f"{self.Rows}x{self.Columns}"
            raise SynthesisError(f"Placement.side {self.side} is not the long side of {shape}")
        for name, offset, extent in (("top", self.top, self.Rows), ("left", self.left, self.Columns)):
            if offset != (self.side - extent) // 2:
                raise SynthesisError(
                    f"Placement.{name} {offset!r} does not centre {extent} px in a {self.side} px square"
                )

    @property
    def scale(self) -> float:
        """Model pixels per source pixel."""
        return self.resolution / self.side

    @property
    def crop_rows(self) -> int:
        """Rows of a restored view: the source's rows at model scale (R for portrait or square)."""
        return max(1, _round_half_up(self.Rows * self.scale))

    @property
    def crop_columns(self) -> int:
        """Columns of a restored view: the source's columns at model scale (R for landscape/square)."""
        return max(1, _round_half_up(self.Columns * self.scale))

    @property
    def crop_top(self) -> int:
        """First row of the source's region in a model-resolution view (centred, like ``top``)."""
        return (self.resolution - self.crop_rows) // 2

    @property
    def crop_left(self) -> int:
        """First column of the source's region in a model-resolution view (centred, like ``left``)."""
        return (self.resolution - self.crop_columns) // 2


@dataclass(frozen=True)
class PreparedRadiograph:
    """The engine's input made from one radiograph, and the facts the writer needs about the source.

    ``image`` is float32 (R, R) in [0, 1], bone bright; ``lossy`` is True when the source was ever
    lossy compressed (its Lossy Image Compression must then stay "01" in anything derived, PS3.3
    C.7.6.1.1.5); ``photometric`` and ``bits_stored`` are the source's.
    """

    image: np.ndarray
    placement: Placement
    lossy: bool
    photometric: str
    bits_stored: int

    def __post_init__(self) -> None:
        R = self.placement.resolution
        if not isinstance(self.image, np.ndarray) or self.image.dtype != np.float32:
            raise SynthesisError(f"prepared image must be a float32 ndarray, got {type(self.image)!r}")
        if self.image.shape != (R, R):
            raise SynthesisError(f"prepared image shape {self.image.shape} is not ({R}, {R})")
        if not np.isfinite(self.image).all() or self.image.min() < 0.0 or self.image.max() > 1.0:
            raise SynthesisError("prepared image has values outside [0, 1] or non-finite values")
        if not isinstance(self.lossy, bool):
            raise SynthesisError(f"lossy must be a bool, got {self.lossy!r}")
        if self.photometric not in ("MONOCHROME1", "MONOCHROME2"):
            raise SynthesisError(f"photometric must be MONOCHROME1/2, got {self.photometric!r}")
        if not isinstance(self.bits_stored, int) or not 1 <= self.bits_stored <= 32:
            raise SynthesisError(f"bits_stored must be an int in 1..32, got {self.bits_stored!r}")


@dataclass(frozen=True)
class RestoredViews:
    """Synthetic views as output pixel data: MONOCHROME2, uint16 with ``bits_stored`` bits, one
    Window Center/Width pair per view (PS3.3 C.11.2.1.2.1, LINEAR) spanning that view's body
    (:func:`synthesis.voi_window.body_window`)."""

    pixels: tuple[np.ndarray, ...]
    bits_stored: int
    window_center: tuple[float, ...]
    window_width: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.pixels:
            raise SynthesisError("RestoredViews needs at least one view")
        shape = self.pixels[0].shape
        for i, px in enumerate(self.pixels):
            if not isinstance(px, np.ndarray) or px.dtype != np.uint16 or px.ndim != 2:
                raise SynthesisError(f"view {i} must be a 2-D uint16 array, got {getattr(px, 'dtype', px)!r}")
            if px.shape != shape:
                raise SynthesisError(f"view {i} has shape {px.shape}, view 0 has {shape}")
            if int(px.max()) >= 2**self.bits_stored:
                raise SynthesisError(f"view {i} has value {int(px.max())} beyond {self.bits_stored} bits")
        if len(self.window_center) != len(self.pixels) or len(self.window_width) != len(self.pixels):
            raise SynthesisError(
                f"{len(self.pixels)} views but {len(self.window_center)} window centers and "
                f"{len(self.window_width)} widths"
            )
        if min(self.window_width) < 1:
            raise SynthesisError(f"window widths must be >= 1, got {self.window_width}")

    @property
    def Rows(self) -> int:
        return int(self.pixels[0].shape[0])

    @property
    def Columns(self) -> int:
        return int(self.pixels[0].shape[1])


def prepare_radiograph(ds: pydicom.Dataset, resolution: int) -> PreparedRadiograph:
    """Turn a CR, DX or grayscale SC dataset into the engine's (R, R) float32 input in [0, 1].

    Refuses, with :class:`SynthesisError`, other SOP classes, missing Pixel Data, colour, multi-frame,
    images with a side under MIN_SIDE px and transfer syntaxes no installed plugin decodes.
    """
    if not isinstance(resolution, int) or isinstance(resolution, bool) or resolution < 1:
        raise SynthesisError(f"resolution must be a positive int, got {resolution!r}")
    SOPClassUID = ds.get("SOPClassUID")
    if SOPClassUID is not None and SOPClassUID not in ACCEPTED_SOP_CLASSES:
        raise SynthesisError(
            f"SOP Class {uid.UID(SOPClassUID).name} ({SOPClassUID}) is not an accepted radiograph "
            "(CR, DX or grayscale SC)"
        )
    _check_pixel_module(ds)
    Rows, Columns = int(ds.Rows), int(ds.Columns)
    if Rows < MIN_SIDE or Columns < MIN_SIDE:
        raise SynthesisError(f"image is too small: {Rows}x{Columns}, both sides must be >= {MIN_SIDE} px")

    displayed = display_pixels(ds)
    side = max(Rows, Columns)
    placement = Placement(
        Rows=Rows,
        Columns=Columns,
        side=side,
        top=(side - Rows) // 2,
        left=(side - Columns) // 2,
        resolution=resolution,
    )
    scaled = _resize(displayed, placement.crop_rows, placement.crop_columns)
    image = np.full((resolution, resolution), scaled.min(), dtype=np.float32)
    top, left = placement.crop_top, placement.crop_left
    image[top : top + placement.crop_rows, left : left + placement.crop_columns] = scaled

    lossy = is_lossy(ds)
    logger.debug(
        "prepared SOP Instance %s: %dx%d %s -> %dx%d (lossy=%s)",
        ds.get("SOPInstanceUID", "?"),
        Rows,
        Columns,
        ds.PhotometricInterpretation,
        resolution,
        resolution,
        lossy,
    )
    return PreparedRadiograph(
        image=image,
        placement=placement,
        lossy=lossy,
        photometric=str(ds.PhotometricInterpretation),
        bits_stored=int(ds.BitsStored),
    )


def display_pixels(ds: pydicom.Dataset) -> np.ndarray:
    """The image as a viewer displays it: float32 (Rows, Columns) in [0, 1], bone bright.

    Any single-frame grayscale image works (no SOP class or size check): decode, Modality LUT, VOI
    (first LUT or first window, else percentiles), MONOCHROME1 inversion, padding to black.
    """
    _check_pixel_module(ds)
    stored = _decode(ds)
    padding = _padding_mask(ds, stored)
    values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
    displayed = _apply_voi(values, ds)
    if displayed is None:
        displayed = _percentile_stretch(values, padding)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        displayed = 1.0 - displayed
    if padding is not None:
        displayed[padding] = 0.0
    return np.ascontiguousarray(np.clip(displayed, 0.0, 1.0), dtype=np.float32)


def is_lossy(ds: pydicom.Dataset) -> bool:
    """True when Lossy Image Compression is "01" or the transfer syntax is (or may be) lossy."""
    if str(ds.get("LossyImageCompression", "")).strip() == "01":
        return True
    TransferSyntaxUID = _transfer_syntax(ds)
    return bool(
        TransferSyntaxUID is not None
        and TransferSyntaxUID.is_compressed
        and TransferSyntaxUID not in _LOSSLESS_COMPRESSED
    )


def restore_views(views: np.ndarray, placement: Placement) -> RestoredViews:
    """Crop model-resolution views back to the source's aspect and quantise them for DICOM output.

    views: float (n, R, R) in [0, 1]. Each restored view is (placement.crop_rows,
    placement.crop_columns) uint16, 12 bits stored, MONOCHROME2.
    """
    views = np.asarray(views)
    R = placement.resolution
    if views.ndim != 3 or views.shape[0] < 1 or views.shape[1:] != (R, R):
        raise SynthesisError(f"views must have shape (n, {R}, {R}) with n >= 1, got {views.shape}")
    if not np.isfinite(views).all():
        raise SynthesisError("views contain NaN or infinite values")
    low, high = float(views.min()), float(views.max())
    if low < -1e-3 or high > 1.0 + 1e-3:
        raise SynthesisError(f"views must lie in [0, 1], got {low:.4f}..{high:.4f}")

    t, h, left, w = placement.crop_top, placement.crop_rows, placement.crop_left, placement.crop_columns
    cropped = np.clip(views[:, t : t + h, left : left + w].astype(np.float64), 0.0, 1.0)
    quantised = np.rint(cropped * _OUTPUT_MAX).astype(np.uint16)
    pixels, centers, widths = [], [], []
    for view in quantised:
        center, width = body_window(view)  # the body's robust percentiles (synthesis/voi_window.py)
        centers.append(center)
        widths.append(width)
        pixels.append(np.ascontiguousarray(view))
    return RestoredViews(
        pixels=tuple(pixels),
        bits_stored=OUTPUT_BITS_STORED,
        window_center=tuple(centers),
        window_width=tuple(widths),
    )


def _check_pixel_module(ds: pydicom.Dataset) -> None:
    """Refuse what has no single-frame grayscale pixel data, before spending time on decoding."""
    if "PixelData" not in ds:
        other = [k for k in ("FloatPixelData", "DoubleFloatPixelData") if k in ds]
        if other:
            raise SynthesisError(f"{other[0]} is not supported: only integer Pixel Data (7FE0,0010)")
        raise SynthesisError("dataset has no Pixel Data (7FE0,0010)")
    for keyword in ("Rows", "Columns", "BitsAllocated", "BitsStored", "PhotometricInterpretation"):
        if ds.get(keyword) in (None, ""):
            raise SynthesisError(f"dataset lacks {keyword}, needed to read its Pixel Data")
    SamplesPerPixel = int(ds.get("SamplesPerPixel", 1))
    PhotometricInterpretation = str(ds.PhotometricInterpretation)
    if SamplesPerPixel != 1 or PhotometricInterpretation not in ("MONOCHROME1", "MONOCHROME2"):
        raise SynthesisError(
            f"colour image (Samples per Pixel {SamplesPerPixel}, Photometric Interpretation "
            f"{PhotometricInterpretation}): only grayscale MONOCHROME1/MONOCHROME2 is accepted"
        )
    NumberOfFrames = int(ds.get("NumberOfFrames") or 1)
    if NumberOfFrames > 1:
        raise SynthesisError(f"multi-frame image (Number of Frames {NumberOfFrames}): only single frames")


def _transfer_syntax(ds: pydicom.Dataset) -> uid.UID | None:
    file_meta = getattr(ds, "file_meta", None)
    value = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    return uid.UID(str(value)) if value else None


def _decode(ds: pydicom.Dataset) -> np.ndarray:
    """Stored values via pydicom's pixel handlers; a clear error naming the transfer syntax if not."""
    TransferSyntaxUID = _transfer_syntax(ds)
    label = f"{TransferSyntaxUID.name} ({TransferSyntaxUID})" if TransferSyntaxUID else "unknown"
    if TransferSyntaxUID is not None:
        try:
            decoder = get_decoder(TransferSyntaxUID)
        except NotImplementedError as e:
            raise SynthesisError(f"transfer syntax {label} has no pixel data decoder") from e
        if not decoder.is_available:
            missing = "; ".join(decoder.missing_dependencies)
            raise SynthesisError(f"transfer syntax {label} cannot be decoded: missing plugins ({missing})")
    try:
        stored = ds.pixel_array
    except Exception as e:  # third-party codecs raise anything; this is the boundary to them
        raise SynthesisError(f"pixel data in transfer syntax {label} could not be decoded: {e}") from e
    if stored.ndim != 2:
        raise SynthesisError(f"decoded pixel data has shape {stored.shape}, expected one 2-D frame")
    return stored


def _padding_mask(ds: pydicom.Dataset, stored: np.ndarray) -> np.ndarray | None:
    """Pixels marked as padding by Pixel Padding Value (and Range Limit), or None when there are none."""
    PixelPaddingValue = ds.get("PixelPaddingValue")
    if PixelPaddingValue is None or isinstance(PixelPaddingValue, bytes):
        return None
    limit = ds.get("PixelPaddingRangeLimit")
    if limit is None or isinstance(limit, bytes):
        mask = stored == int(PixelPaddingValue)
    else:
        low, high = sorted((int(PixelPaddingValue), int(limit)))
        mask = (stored >= low) & (stored <= high)
    return mask if mask.any() and not mask.all() else None


def _first_value(ds: pydicom.Dataset, keyword: str) -> float | None:
    elem = ds.get(keyword)
    if elem is None or elem == "":
        return None
    value = elem[0] if isinstance(elem, MultiValue) else elem
    return None if value in (None, "") else float(value)


def _apply_voi(values: np.ndarray, ds: pydicom.Dataset) -> np.ndarray | None:
    """The first VOI LUT, else the first window, scaled to [0, 1]; None when there is no usable one.

    PS3.3 C.11.2 lets an image carry both; like pydicom and most viewers we prefer the LUT, which for
    CR and DX is usually the vendor's tuned tone curve.
    """
    sequence = ds.get("VOILUTSequence")
    if sequence and "LUTDescriptor" in sequence[0] and "LUTData" in sequence[0]:
        try:
            return _apply_voi_lut_item(values, ds)
        except (ValueError, NotImplementedError, AttributeError, IndexError, TypeError) as e:
            logger.warning("VOI LUT Sequence unusable (%s); trying window or percentiles", e)
    center, width = _first_value(ds, "WindowCenter"), _first_value(ds, "WindowWidth")
    if center is None or width is None:
        return None
    function = str(ds.get("VOILUTFunction") or "LINEAR").strip().upper()
    return _window(values, center, width, function)


def _apply_voi_lut_item(values: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """Apply VOI LUT item 0 (PS3.3 C.11.2.1.1) and scale its output range to [0, 1].

    The output range is 0..2**n-1 with n the LUT Descriptor's third value; some writers declare 16
    bits for 12-bit data, so n is lowered to the bit length of the largest entry (never below 8).
    """
    descriptor = ds.VOILUTSequence[0].LUTDescriptor
    entries = int(descriptor[0]) or 2**16
    first_mapped = int(descriptor[1])
    lut = apply_voi(np.arange(first_mapped, first_mapped + entries, dtype=np.int64), ds, 0)
    bits = max(8, min(int(descriptor[2]), int(lut.max()).bit_length()))
    mapped = apply_voi(np.rint(values).astype(np.int64), ds, 0)
    return mapped.astype(np.float64) / (2**bits - 1)


def _window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray | None:
    """Window Center/Width to [0, 1] by PS3.3 C.11.2.1.2.1 (LINEAR) and C.11.2.1.3 (LINEAR_EXACT,
    SIGMOID); None (with a warning) for invalid values, so percentiles take over."""
    if function == "LINEAR" and width >= 1:
        if width == 1:
            return (values > center - 0.5).astype(np.float64)
        return np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)
    if function == "LINEAR_EXACT" and width > 0:
        return np.clip((values - center) / width + 0.5, 0.0, 1.0)
    if function == "SIGMOID" and width > 0:
        return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    logger.warning("unusable window (function %s, width %s); using percentiles", function, width)
    return None


def _percentile_stretch(values: np.ndarray, padding: np.ndarray | None) -> np.ndarray:
    """Stretch the 0.5th..99.5th percentile range (padding excluded) to [0, 1]."""
    sample = values[~padding] if padding is not None else values
    lo, hi = (float(v) for v in np.percentile(sample, _PERCENTILES))
    if hi <= lo:
        lo, hi = float(sample.min()), float(sample.max())
    if hi <= lo:
        raise SynthesisError(f"image is constant (every pixel {lo:g}): nothing to synthesise from")
    return np.clip((values - lo) / (hi - lo), 0.0, 1.0)


def _resize(image: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """Antialiased Lanczos resize of a float image; Lanczos overshoot is clipped back to [0, 1]."""
    if image.shape == (rows, columns):
        resized = image
    else:
        pil = Image.fromarray(image.astype(np.float32))
        resized = np.asarray(pil.resize((columns, rows), Image.Resampling.LANCZOS))
    return np.ascontiguousarray(np.clip(resized, 0.0, 1.0), dtype=np.float32)


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))
