"""Routing rules: which received instances are synthesised, at which angles, and where results go.

A rule is site configuration (``[[rules]]`` in the TOML file). The scheduler asks two questions of
every received instance, in this order:

1. :func:`loop_reason` -- must this instance never be processed? PACS routing rules often send our
   own output back to us, so synthetic or our own derived images are refused before any rule is
   looked at (see /work/shared/dicom-conventions.md, "Loop prevention"). Image Type DERIVED alone
   is not enough by default: CR readers often label processed radiographs DERIVED\\PRIMARY.
2. :func:`matching_rules` -- which enabled rules accept it?

Both work on :class:`InstanceFacts`, the few attributes that decide, taken from a dataset by
:func:`facts_from_dataset`. Real radiographs often lack View Position or Body Part Examined or carry
them in odd case, so matching is case-insensitive and a missing attribute is the empty string.
"""

from __future__ import annotations

import logging
import math
import re
import struct
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, cast

from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.uid import RE_VALID_UID

from dicomnode.errors import ConfigError

logger = logging.getLogger(__name__)

# Purpose of Reference (109100, DCM, "Synthesizing Equipment"), PS3.16 CID 7005, as written into
# Contributing Equipment Sequence (0018,A001) of every instance this node derives.
SYNTHESIZING_EQUIPMENT = ("109100", "DCM")

# Largest angle, in degrees, a rule may ask for: SV-DRR is trained for rotations within +-90.
MAX_ANGLE_DEG = 90.0

# What ``[loop_prevention] skip_derived`` may say: which Image Type (0008,0008) values are skipped.
# See :func:`loop_reason` and ``LoopPreventionSettings`` in :mod:`dicomnode.config`.
SkipDerived = Literal["secondary", "all", "none"]

# Code String (CS) values are at most 16 characters (PS3.5 Table 6.2-1).
_CS_MAX_LENGTH = 16
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# What pydicom raises when it converts a malformed raw element on first access (a truncated
# sequence reads as OSError, a value of the wrong length as BytesLengthException or struct.error).
_UNREADABLE = (
    ValueError,
    TypeError,
    AttributeError,
    LookupError,
    OSError,
    struct.error,
    BytesLengthException,
    InvalidDicomError,
)


@dataclass(frozen=True, kw_only=True)
class InstanceFacts:
    """The attributes of one received instance that loop prevention and rule matching look at.

    Text values are stripped; a missing attribute is ``""``. ``contributing_device_uids`` holds the
    Device UID (0018,1002) of every Contributing Equipment item; ``contributing_manufacturers``
    holds the Manufacturer of those items whose Purpose of Reference is Synthesizing Equipment
    (109100, DCM) only, since a manufacturer name in any other role says nothing about synthesis.
    """

    sop_class_uid: str = ""
    modality: str = ""
    body_part_examined: str = ""
    view_position: str = ""
    image_type: tuple[str, ...] = ()
    synthetic_data: bool = False
    contributing_device_uids: tuple[str, ...] = ()
    contributing_manufacturers: tuple[str, ...] = ()


class LoopFlags(Protocol):
    """The switches of the ``[loop_prevention]`` settings section."""

    @property
    def skip_derived(self) -> SkipDerived: ...

    @property
    def skip_own_device(self) -> bool: ...


class HasLoopFlags(Protocol):
    """Anything carrying a ``loop_prevention`` section, such as the whole settings object."""

    @property
    def loop_prevention(self) -> LoopFlags: ...


def _label(name: object) -> str:
    return f"rules[{name}]" if isinstance(name, str) and name else f"rules[{name!r}]"


def _strings(where: str, value: object, *, cs: bool) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ConfigError(f"{where}: must be a list of strings, got {value!r}")
    for item in value:
        if not isinstance(item, str):
            raise ConfigError(f"{where}: must be a list of strings, got item {item!r}")
        if cs and (len(item) > _CS_MAX_LENGTH or "\\" in item or _CONTROL.search(item)):
            raise ConfigError(
                f"{where}: {item!r} is not a single Code String value "
                f"(at most {_CS_MAX_LENGTH} characters, no backslash, PS3.5 VR CS)"
            )
    return tuple(value)


def _angles(where: str, value: object) -> tuple[float, ...]:
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ConfigError(f"{where}: must be a list of angles in degrees, got {value!r}")
    angles = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, int | float) or not math.isfinite(item):
            raise ConfigError(f"{where}: angles must be numbers in degrees, got {item!r}")
        if not -MAX_ANGLE_DEG <= item <= MAX_ANGLE_DEG:
            raise ConfigError(f"{where}: each angle must be in [-90, 90] degrees, got {item!r}")
        angles.append(float(item))
    return tuple(angles)


def _matches(allowed: tuple[str, ...], value: str) -> bool:
    """Case-insensitive exact match; ``()`` accepts anything, ``""`` in the list accepts a missing value."""
    if not allowed:
        return True
    wanted = value.strip().casefold()
    return any(item.strip().casefold() == wanted for item in allowed)


# Rule priorities and the queue priority of their jobs: due "stat" jobs are claimed before due
# "routine" ones, whatever their age.
PRIORITIES: dict[str, int] = {"stat": 20, "urgent": 10, "routine": 0}


@dataclass(frozen=True, kw_only=True)
class Rule:
    """One ``[[rules]]`` entry: which instances to synthesise from, at which views, sent where.

    Every list of strings is a filter: ``()`` accepts any value, otherwise the instance's value must
    equal one item (case-insensitive; surrounding spaces ignored). An instance without the attribute
    has the value ``""``, so it passes only an empty list or a list containing ``""``.
    ``sop_classes`` compares UIDs exactly. ``elevations`` left empty means 0 degrees for every
    azimuth; after construction it always has one value per azimuth. ``destinations`` are peer
    names (checked against ``[[peers]]`` by the settings loader); empty means store only.
    """

    name: str
    azimuths: tuple[float, ...]
    elevations: tuple[float, ...] = ()
    sop_classes: tuple[str, ...] = ()
    modalities: tuple[str, ...] = ()
    body_parts: tuple[str, ...] = ()
    view_positions: tuple[str, ...] = ()
    destinations: tuple[str, ...] = ()
    enabled: bool = True
    sweep: bool = False  # also one Multi-frame SC per request, the views as cine frames (derived_sweep)
    priority: str = "routine"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip() or _CONTROL.search(self.name):
            raise ConfigError(f"{_label(self.name)}.name: must be a non-empty printable string")
        where = _label(self.name)
        azimuths = _angles(f"{where}.azimuths", self.azimuths)
        if not azimuths:
            raise ConfigError(f"{where}.azimuths: must name at least one view angle, got []")
        elevations = _angles(f"{where}.elevations", self.elevations) or tuple(0.0 for _ in azimuths)
        if len(elevations) != len(azimuths):
            raise ConfigError(
                f"{where}.elevations: must be empty or have one value per azimuth "
                f"({len(azimuths)}), got {len(elevations)}"
            )
        views = list(zip(azimuths, elevations, strict=True))
        for i, view in enumerate(views):
            if view in views[:i]:
                key = "azimuths" if not any(elevations) else "azimuths/elevations"
                raise ConfigError(f"{where}.{key}: duplicate view (azimuth, elevation) = {view}")
        sop_classes = _strings(f"{where}.sop_classes", self.sop_classes, cs=False)
        for uid in sop_classes:
            if len(uid) > 64 or not RE_VALID_UID.match(uid):
                raise ConfigError(f"{where}.sop_classes: {uid!r} is not a valid UID (PS3.5 9.1)")
        object.__setattr__(self, "azimuths", azimuths)
        object.__setattr__(self, "elevations", elevations)
        object.__setattr__(self, "sop_classes", sop_classes)
        for key in ("modalities", "body_parts", "view_positions"):
            object.__setattr__(self, key, _strings(f"{where}.{key}", getattr(self, key), cs=True))
        destinations = _strings(f"{where}.destinations", self.destinations, cs=False)
        if len(set(destinations)) != len(destinations):
            raise ConfigError(f"{where}.destinations: names a peer twice: {list(destinations)}")
        object.__setattr__(self, "destinations", destinations)
        if not isinstance(self.enabled, bool):
            raise ConfigError(f"{where}.enabled: must be true or false, got {self.enabled!r}")
        if not isinstance(self.sweep, bool):
            raise ConfigError(f"{where}.sweep: must be true or false, got {self.sweep!r}")
        if self.sweep and len(azimuths) < 2:
            raise ConfigError(f"{where}.sweep: a rotation sweep needs at least two views, got {len(azimuths)}")
        if self.priority not in PRIORITIES:
            raise ConfigError(f"{where}.priority: must be one of {', '.join(PRIORITIES)}, got {self.priority!r}")

    @property
    def queue_priority(self) -> int:
        """The job queue's priority for this rule's jobs (higher is claimed first)."""
        return PRIORITIES[self.priority]

    @property
    def views(self) -> tuple[tuple[float, float], ...]:
        """The requested views as (azimuth, elevation) pairs in degrees."""
        return tuple(zip(self.azimuths, self.elevations, strict=True))

    def matches(self, facts: InstanceFacts) -> bool:
        """Whether this rule's filters accept the instance (``enabled`` is not looked at here)."""
        if self.sop_classes and facts.sop_class_uid not in self.sop_classes:
            return False
        return (
            _matches(self.modalities, facts.modality)
            and _matches(self.body_parts, facts.body_part_examined)
            and _matches(self.view_positions, facts.view_position)
        )


def matching_rules(rules: Iterable[Rule], facts: InstanceFacts) -> list[Rule]:
    """The enabled rules that accept ``facts``, in configuration order."""
    return [rule for rule in rules if rule.enabled and rule.matches(facts)]


def _text(ds: Dataset | Mapping[str, Any], keyword: str) -> str:
    """The first value of ``keyword`` as stripped text, ``""`` when missing or unreadable."""
    try:
        value = ds.get(keyword)
    except _UNREADABLE as e:
        logger.debug("unreadable %s treated as missing: %s", keyword, e)
        return ""
    if isinstance(value, MultiValue | list | tuple):
        value = value[0] if len(value) else None
    if value is None:
        return ""
    if isinstance(value, bytes):
        value = value.decode("ascii", errors="replace")
    return str(value).strip()


def _values(ds: Dataset | Mapping[str, Any], keyword: str) -> tuple[str, ...]:
    try:
        value = ds.get(keyword)
    except _UNREADABLE as e:
        logger.debug("unreadable %s treated as missing: %s", keyword, e)
        return ()
    if value is None:
        return ()
    items = value if isinstance(value, MultiValue | list | tuple) else [value]
    return tuple(str(item).strip().upper() for item in items if item is not None)


def _items(ds: Dataset | Mapping[str, Any], keyword: str) -> list[Dataset]:
    try:
        seq = ds.get(keyword)
    except _UNREADABLE as e:
        logger.debug("unreadable %s treated as missing: %s", keyword, e)
        return []
    if seq is None or isinstance(seq, str | bytes):
        return []
    try:
        return [item for item in seq if isinstance(item, Dataset)]
    except TypeError:
        return []


def _is_synthesizing(item: Dataset) -> bool:
    return any(
        (_text(code, "CodeValue"), _text(code, "CodingSchemeDesignator")) == SYNTHESIZING_EQUIPMENT
        for code in _items(item, "PurposeOfReferenceCodeSequence")
    )


def facts_from_dataset(ds: Dataset | Mapping[str, Any]) -> InstanceFacts:
    """Read the deciding attributes of ``ds``; missing, empty or malformed values never raise.

    ``ds`` may also be the attribute values by keyword (:func:`dicomnode.dataset_head.read_head`).
    SOP Class UID falls back to the File Meta Information's Media Storage SOP Class UID (PS3.10
    7.1) when the data set itself lacks it.
    """
    sop_class_uid = _text(ds, "SOPClassUID")
    file_meta = getattr(ds, "file_meta", None)
    if not sop_class_uid and isinstance(file_meta, Dataset):
        sop_class_uid = _text(file_meta, "MediaStorageSOPClassUID")
    equipment = _items(ds, "ContributingEquipmentSequence")
    return InstanceFacts(
        sop_class_uid=sop_class_uid,
        modality=_text(ds, "Modality"),
        body_part_examined=_text(ds, "BodyPartExamined"),
        view_position=_text(ds, "ViewPosition"),
        image_type=_values(ds, "ImageType"),
        synthetic_data=_text(ds, "SyntheticData").upper() == "YES",
        contributing_device_uids=tuple(uid for item in equipment if (uid := _text(item, "DeviceUID"))),
        contributing_manufacturers=tuple(
            name for item in equipment if _is_synthesizing(item) and (name := _text(item, "Manufacturer"))
        ),
    )


def loop_reason(
    facts: InstanceFacts,
    settings_or_flags: LoopFlags | HasLoopFlags,
    own_device_uids: Collection[str],
    own_manufacturer: str,
) -> str | None:
    """Why this instance must never be processed, or ``None`` when it may be.

    In order: Synthetic Data (0008,001C) YES (always, PS3.3 C.7.6.1.1.3 -- not configurable);
    with ``skip_own_device``, one of ``own_device_uids`` (the Device UIDs of our model weights,
    present and past) as Device UID in Contributing Equipment (0018,A001), or ``own_manufacturer``
    as the Manufacturer of a Synthesizing Equipment (109100, DCM) item (catches output of older
    weights whose UID is no longer known); then Image Type (0008,0008) (PS3.3 C.7.6.1.1.2) as
    ``skip_derived`` says: ``"secondary"`` skips value 1 DERIVED with value 2 SECONDARY (our own
    output, Secondary Captures, reformatted images) but processes DERIVED\\PRIMARY, which CR
    readers commonly write on processed radiographs; ``"all"`` skips any value 1 DERIVED;
    ``"none"`` never skips on Image Type. The reason names the rule that fired.
    """
    flags = cast(LoopFlags, getattr(settings_or_flags, "loop_prevention", settings_or_flags))
    if facts.synthetic_data:
        return "Synthetic Data (0008,001C) is YES"
    if flags.skip_own_device:
        ours = set(own_device_uids)
        for uid in facts.contributing_device_uids:
            if uid in ours:
                return f"Contributing Equipment (0018,A001) names this node's Device UID {uid}"
        wanted = own_manufacturer.strip().casefold()
        if wanted and any(name.casefold() == wanted for name in facts.contributing_manufacturers):
            return (
                "Contributing Equipment (0018,A001) has a Synthesizing Equipment (109100) item "
                f"from this node's manufacturer {own_manufacturer.strip()!r}"
            )
    image_type = tuple(value.upper() for value in facts.image_type[:2])
    if flags.skip_derived == "all" and image_type[:1] == ("DERIVED",):
        return 'Image Type (0008,0008) value 1 is DERIVED (loop_prevention.skip_derived = "all")'
    if flags.skip_derived == "secondary" and image_type == ("DERIVED", "SECONDARY"):
        return 'Image Type (0008,0008) is DERIVED\\SECONDARY (loop_prevention.skip_derived = "secondary")'
    return None
