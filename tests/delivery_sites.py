"""A node's delivery side on real files for the destination tests: settings from a TOML file, a
migrated SQLite database, the instance store, and derived Secondary Capture series recorded with
pending deliveries, as the worker leaves them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.config import Settings, load_settings
from dicomnode.delivery import deliver_due
from dicomnode.derived import GeneratorInfo, build_derived_instances
from storage.db import make_engine, session_factory, upgrade
from storage.deliveries import DeliveryTarget, create_deliveries
from storage.instances import fields_from_dataset, record_instance
from storage.models import Delivery, Instance
from storage.store import InstanceStore
from tests.dicom_nodes import pydicom_file

GENERATOR = GeneratorInfo(
    model_name="svdrr-test", model_version="0", model_identity="ab" * 32, node_version="0.1.0"
)


@dataclass
class Site:
    """Settings, store and database of a node that only delivers."""

    settings: Settings
    store: InstanceStore
    sessions: sessionmaker[Session]

    def derived_series(self, count: int = 3, seed: int = 1) -> list[pydicom.Dataset]:
        """A synthetic series in the study of the real CR ``RG1_UNCR.dcm``, stored and recorded, with a
        pending delivery of each instance to every configured peer."""
        source = pydicom.dcmread(pydicom_file("RG1_UNCR.dcm"))
        rng = np.random.default_rng(seed)
        pixels = [rng.integers(0, 1 << 12, size=(64, 48), dtype=np.uint16) for _ in range(count)]
        views = [(-90.0 + 60.0 * i, 0.0) for i in range(count)]
        instances = build_derived_instances(
            source, pixels, 12, None, None, views, GENERATOR, seed=seed, steps=2, guidance_scale=3.0
        )
        with self.sessions.begin() as session:
            for ds in instances:
                stored = self.store.write_dataset(ds)
                fields = fields_from_dataset(ds)
                fields.update(path=stored.path, sha256=stored.sha256, size_bytes=stored.size_bytes, synthetic=True)
                row = record_instance(session, origin="derived", **fields)
                targets = [
                    DeliveryTarget(p.name, p.ae_title or "STOW-RS", p.host, p.port) for p in self.settings.peers
                ]
                create_deliveries(session, row.id, targets)
        return instances

    def deliver(self) -> int:
        return deliver_due(self.settings, self.sessions, self.store)

    def deliveries(self) -> dict[str, Delivery]:
        """Every delivery by the SOP Instance UID of its instance (one peer per test site)."""
        with self.sessions() as session:
            rows = session.execute(
                select(Delivery, Instance.sop_instance_uid).join(Instance, Instance.id == Delivery.output_instance_id)
            )
            return {uid: d for d, uid in rows}

    def make_due(self) -> None:
        """Skip the backoff: every pending delivery is due now."""
        from storage.models import utcnow

        with self.sessions.begin() as session:
            for d in session.scalars(select(Delivery).where(Delivery.state == "pending")):
                d.not_before = utcnow()


def make_site(folder: Path, peers: str, node: str = "", max_attempts: int = 3) -> Site:
    """A site from a real TOML file: ``peers`` is the [[peers]] text, ``node`` extra [node] keys."""
    config = folder / "dicomnode.toml"
    config.write_text(
        f"""
[node]
ae_title = "SVDRR"
storage_dir = "{folder / "var"}"
min_free_mb = 0
{node}

[engine]
model = "{folder / "no-model"}"

[scheduler]
backoff_initial_s = 60
backoff_max_s = 600
delivery_max_attempts = {max_attempts}

{peers}
"""
    )
    (folder / "no-model").mkdir(exist_ok=True)  # a model still to come: a missing folder fails config check
    settings = load_settings(config, env={})
    engine = make_engine(settings.node.effective_database_url)
    upgrade(engine)
    store = InstanceStore(settings.node.storage_dir, 0)
    return Site(settings, store, session_factory(engine))
