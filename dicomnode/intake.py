"""What happens to a received instance inside its C-STORE transaction: rules -> queued jobs.

Called by the SCP after the instance row is written and before the commit, so an acknowledged
instance that a rule matches always has its job: a crash cannot fall between the two. Only cheap
header work happens here (no pixels, no model). Loop prevention runs first: our own output, or any
synthetic or derived image, is stored but never processed (dicom-conventions.md, "Loop prevention").
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Collection
from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from dicomnode.config import Settings
from dicomnode.rules import InstanceFacts, Rule, loop_reason, matching_rules
from storage.instances import ReceivedRow
from storage.jobs import enqueue_job
from storage.models import Instance, Job, utcnow

logger = logging.getLogger(__name__)


def request_key(sop_instance_uid: str, rule: Rule) -> str:
    """Same input + same request -> same key, so a re-received instance does not queue twice."""
    request = {
        "sop": sop_instance_uid,
        "rule": rule.name,
        "azimuths": list(rule.azimuths),
        "elevations": list(rule.elevations),
        "destinations": list(rule.destinations),
    }
    return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()


class Intake:
    """The SCP's intake callback: ``intake(session, instance, facts)``, the facts read from the
    instance's data set (:func:`dicomnode.rules.facts_from_dataset`)."""

    def __init__(self, settings: Settings, own_device_uids: Collection[str] = ()):
        self.settings = settings
        self.own_device_uids = own_device_uids

    def __call__(self, session: Session, instance: ReceivedRow | Instance, facts: InstanceFacts) -> list[Job]:
        reason = loop_reason(facts, self.settings, self.own_device_uids, self.settings.output.manufacturer)
        if reason:
            logger.info("instance %d stored, not processed: %s", instance.id, reason)
            return []
        rules = matching_rules(self.settings.rules, facts)
        if not rules:
            logger.debug("instance %d stored; no rule matches", instance.id)
            return []
        now = utcnow()
        not_before = now + timedelta(seconds=self.settings.scheduler.settle_s)
        jobs = []
        for rule in rules:
            job = enqueue_job(
                session,
                input_instance_id=instance.id,
                rule_name=rule.name,
                azimuths=rule.azimuths,
                elevations=rule.elevations or [0.0] * len(rule.azimuths),
                destinations=rule.destinations,
                request_key=request_key(instance.sop_instance_uid, rule),
                max_attempts=self.settings.scheduler.max_attempts,
                not_before=not_before,
                now=now,
                priority=rule.queue_priority,
            )
            jobs.append(job)
            logger.info("instance %d matched rule %r: job %d queued", instance.id, rule.name, job.id)
        self._settle_study(session, instance.study_instance_uid, not_before)
        return jobs

    @staticmethod
    def _settle_study(session: Session, study_instance_uid: str, not_before: object) -> None:
        """Debounce per study: each new instance pushes back the study's queued jobs."""
        in_study = select(Instance.id).where(Instance.study_instance_uid == study_instance_uid)
        session.execute(
            update(Job)
            .where(Job.state == "queued", Job.attempts == 0, Job.input_instance_id.in_(in_study))
            .where(Job.not_before < not_before)
            .values(not_before=not_before)
        )
