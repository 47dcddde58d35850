"""The rule tester: which rule would take this file, and why each of the others would not.

Nothing is stored: the uploaded bytes are parsed in memory, run through the same loop prevention
and rule matching the intake uses (:mod:`dicomnode.rules`), and explained filter by filter.
"""

from __future__ import annotations

import dataclasses
from io import BytesIO
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError

from dicomnode.config import Settings
from dicomnode.errors import NodeError
from dicomnode.rules import InstanceFacts, Rule, facts_from_dataset, loop_reason


class RuleTestError(NodeError):
    """The uploaded file cannot be tested (not DICOM)."""


def _filter_reasons(rule: Rule, facts: InstanceFacts) -> list[str]:
    reasons = []
    if rule.sop_classes and facts.sop_class_uid not in rule.sop_classes:
        reasons.append(f"SOP Class UID {facts.sop_class_uid or '(none)'} is not in sop_classes")
    checks = (
        ("modalities", "Modality (0008,0060)", facts.modality),
        ("body_parts", "Body Part Examined (0018,0015)", facts.body_part_examined),
        ("view_positions", "View Position (0018,5101)", facts.view_position),
    )
    for key, name, value in checks:
        allowed = getattr(rule, key)
        if allowed and not any(item.strip().casefold() == value.strip().casefold() for item in allowed):
            reasons.append(f"{name} {value or '(empty)'!r} is not in {key} {list(allowed)}")
    return reasons


def explain(settings: Settings, data: bytes) -> dict[str, Any]:
    """Facts, loop-prevention verdict and, per rule, match or the reasons it does not match."""
    try:
        ds = pydicom.dcmread(BytesIO(data), stop_before_pixels=True, force=False)
    except (InvalidDicomError, ValueError, EOFError, OSError) as e:
        raise RuleTestError(f"not a DICOM file: {e}") from e
    facts = facts_from_dataset(ds)
    loop = loop_reason(facts, settings, (), settings.output.manufacturer)
    rules = []
    for rule in settings.rules:
        reasons = _filter_reasons(rule, facts)
        if not rule.enabled:
            reasons.insert(0, "the rule is disabled (enabled = false)")
        if loop:
            reasons.insert(0, f"loop prevention: {loop}")
        rules.append(
            {
                "name": rule.name,
                "matches": not reasons,
                "reasons": reasons,
                "views": [{"azimuth": a, "elevation": e} for a, e in rule.views],
                "destinations": list(rule.destinations),
            }
        )
    return {
        "facts": dataclasses.asdict(facts),
        "loop_prevention": loop,
        "rules": rules,
        "matched": [r["name"] for r in rules if r["matches"]],
    }
