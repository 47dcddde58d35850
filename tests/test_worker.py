"""The synthesis worker in-process: intake -> claim -> synthesise -> store -> outputs, retries."""

from __future__ import annotations

import json
import shutil
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from dicomnode.config import Settings, load_settings
from dicomnode.intake import Intake
from dicomnode.rules import facts_from_dataset
from dicomnode.worker import SynthesisWorker, backoff_s
from storage.db import make_engine, session_factory, upgrade
from storage.instances import fields_from_dataset, record_instance
from storage.models import Delivery, Instance, Job, Output, utcnow
from storage.store import InstanceStore
from tests.peers import node_config


def settings_for(tmp_path: Path, model: Path, azimuths: str = "[-30, 30, 90]") -> Settings:
    return load_settings(node_config(tmp_path, port=11112, model=model, pacs_port=None, settle_s=0, azimuths=azimuths))


def receive(settings: Settings, ds: pydicom.Dataset) -> int:
    """What the SCP does for a C-STORE, minus the network: write, record, intake, commit."""
    engine = make_engine(settings.node.effective_database_url)
    upgrade(engine)
    store = InstanceStore(settings.node.storage_dir, 2**20)
    stored = store.write_dataset(ds)
    with session_factory(engine).begin() as session:
        fields = fields_from_dataset(ds)
        fields.update(path=stored.path, sha256=stored.sha256, size_bytes=stored.size_bytes)
        row = record_instance(session, origin="received", **fields)
        Intake(settings)(session, row, facts_from_dataset(ds))
        return row.id


def run_job(settings: Settings, ds: pydicom.Dataset) -> tuple[SynthesisWorker, Job]:
    """Receive ``ds``, let a worker run its one job; the worker and the job (detached)."""
    receive(settings, ds)
    worker = SynthesisWorker(settings, "test-worker")
    assert worker.run_once() is True
    with worker.sessions() as session:
        job = session.query(Job).one()
        session.expunge(job)
    return worker, job


def chest(sop_uid: str | None = None) -> pydicom.Dataset:
    ds = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop_uid or generate_uid()
    return ds


def test_job_runs_to_derived_instances_and_outputs(tmp_path: Path, tiny_pixel_model_dir: Path) -> None:
    settings = settings_for(tmp_path, tiny_pixel_model_dir)
    receive(settings, chest())
    worker = SynthesisWorker(settings, "test-worker")
    assert worker.run_once() is True
    assert worker.run_once() is False  # nothing else due
    with worker.sessions() as session:
        job = session.query(Job).one()
        assert job.state == "done", job.last_error
        derived = session.query(Instance).filter_by(origin="derived").all()
        assert len(derived) == 3 and all(d.synthetic for d in derived)
        outputs = session.query(Output).order_by(Output.azimuth).all()
        assert [o.azimuth for o in outputs] == [-30.0, 30.0, 90.0]
        assert {o.model_identity for o in outputs} == {worker.model.identity}
        assert session.query(Delivery).count() == 0  # the rule has no destinations
        for row in derived:
            ds = worker.store.open_dataset(row.path)
            assert ds.SyntheticData == "YES" and ds.StudyInstanceUID == job.input_instance.study_instance_uid
        uids = sorted(d.sop_instance_uid for d in derived)
        job.state = "queued"  # a retried job (say, after a crash before the commit of 'done')
        session.commit()
    assert worker.run_once() is True
    with worker.sessions() as session:
        again = sorted(d.sop_instance_uid for d in session.query(Instance).filter_by(origin="derived"))
        assert again == uids, "a re-run finds its own deterministic UIDs; nothing is duplicated"


def test_without_engine_steps_the_worker_samples_as_the_model_recommends(
    tmp_path: Path, tiny_pixel_model_dir: Path
) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_pixel_model_dir, model)
    gate = {"method": "denoise", "threshold": -1000.0}  # every input passes
    meta = {"format": 1, "recommended": {"steps": 1, "guidance_scale": 1.25}, "gate": gate}
    (model / "dicomnode-model.json").write_text(json.dumps(meta), encoding="utf-8")
    config = node_config(tmp_path, port=11112, model=model, pacs_port=None, settle_s=0, azimuths="[30]")
    text = config.read_text(encoding="utf-8")
    config.write_text(text.replace("steps = 2\n", "").replace("guidance_scale = 3.0\n", ""), encoding="utf-8")
    settings = load_settings(config)
    assert (settings.engine.steps, settings.engine.guidance_scale) == (None, None)
    worker, job = run_job(settings, chest())
    assert job.state == "done", job.last_error
    with worker.sessions() as session:
        output = session.query(Output).one()
        assert (output.steps, output.guidance_scale) == (1, 1.25)
        ds = worker.store.open_dataset(output.instance.path)
    assert "steps=1" in ds.DerivationDescription and "guidance_scale=1.25" in ds.DerivationDescription

    # Set in the configuration, the site's values win over the model's.
    overridden = load_settings(config, overrides={"engine.steps": 2, "engine.guidance_scale": 3.0})
    worker = SynthesisWorker(overridden, "w2")
    assert (worker.load_model().steps, worker.load_model().guidance_scale) == (2, 3.0)


def test_our_output_received_back_makes_no_job(tmp_path: Path, tiny_pixel_model_dir: Path) -> None:
    settings = settings_for(tmp_path, tiny_pixel_model_dir, azimuths="[45]")
    receive(settings, chest())
    worker = SynthesisWorker(settings, "w")
    worker.run_once()
    with worker.sessions() as session:
        row = session.query(Instance).filter_by(origin="derived").one()
    own = worker.store.open_dataset(row.path)
    own.SOPInstanceUID = own.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    own.Modality = "CR"
    receive(settings, own)
    with worker.sessions() as session:
        assert session.query(Job).count() == 1


def test_missing_model_parks_the_job(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, tmp_path / "absent")
    receive(settings, chest())
    worker = SynthesisWorker(settings, "w")
    assert worker.run_once() is True
    with worker.sessions() as session:
        job = session.query(Job).one()
        assert job.state == "waiting_model" and "does not exist" in job.last_error and job.attempts == 0


def test_a_model_folder_still_to_come_parks_the_job(tmp_path: Path) -> None:
    (tmp_path / "model-to-come").mkdir()  # the site made the folder; model_index.json is not there yet
    settings = settings_for(tmp_path, tmp_path / "model-to-come")
    receive(settings, chest())
    worker = SynthesisWorker(settings, "w")
    assert worker.run_once() is True
    with worker.sessions() as session:
        job = session.query(Job).one()
        assert job.state == "waiting_model" and "no model_index.json" in job.last_error and job.attempts == 0


def test_failures_back_off_then_fail(tmp_path: Path, tiny_pixel_model_dir: Path) -> None:
    settings = settings_for(tmp_path, tiny_pixel_model_dir)
    receive(settings, chest())
    worker = SynthesisWorker(settings, "w")
    with worker.sessions() as session:
        (worker.store.root / session.query(Instance).one().path).unlink()  # the input vanished
    for attempt in range(1, settings.scheduler.max_attempts + 1):
        with worker.sessions.begin() as session:
            session.query(Job).update({"not_before": utcnow() - timedelta(seconds=1)})
        assert worker.run_once() is True
        with worker.sessions() as session:
            job = session.query(Job).one()
            assert job.attempts == attempt and job.last_error
    assert job.state == "failed"


def test_backoff_doubles_and_caps() -> None:
    assert [backoff_s(a, 10, 60) for a in (1, 2, 3, 4, 5)] == [10, 20, 40, 60, 60]


@pytest.mark.parametrize("settle_s", [30.0])
def test_settle_delay_is_per_study_and_debounced(tmp_path: Path, tiny_pixel_model_dir: Path, settle_s: float) -> None:
    path = node_config(tmp_path, port=11112, model=tiny_pixel_model_dir, pacs_port=None, settle_s=settle_s)
    settings = load_settings(path)
    first = chest()
    receive(settings, first)
    with session_factory(make_engine(settings.node.effective_database_url))() as session:
        first_due = session.query(Job).one().not_before
    second = chest()
    second.StudyInstanceUID = first.StudyInstanceUID
    receive(settings, second)
    with session_factory(make_engine(settings.node.effective_database_url))() as session:
        jobs = session.query(Job).order_by(Job.id).all()
        assert len(jobs) == 2
        assert jobs[0].not_before > first_due, "a new instance in the study pushes the study's jobs back"
        assert jobs[0].not_before == jobs[1].not_before
    assert SynthesisWorker(settings, "w").run_once() is False  # nothing due while the study settles


def test_each_worker_of_several_takes_its_own_gpu() -> None:
    import torch

    from dicomnode.worker import worker_device

    assert worker_device(torch.device("cuda"), 1) == torch.device("cuda", 1)  # "auto"/"cuda", worker 1
    assert worker_device(torch.device("cuda"), None) == torch.device("cuda")  # a single worker
    assert worker_device(torch.device("cuda", 0), 1) == torch.device("cuda", 0)  # explicit cuda:0 kept
    assert worker_device(torch.device("cpu"), 1) == torch.device("cpu")


def test_stat_rule_jobs_are_claimed_before_older_routine_ones(tmp_path: Path, tiny_pixel_model_dir: Path) -> None:
    path = node_config(
        tmp_path, port=11112, model=tiny_pixel_model_dir, pacs_port=None, settle_s=0, azimuths="[30]"
    )
    text = path.read_text()
    stat_rule = text[text.index("[[rules]]") :].replace('name = "chest"', 'name = "chest-stat"')
    path.write_text(text.replace('modalities = ["CR", "DX"]', 'modalities = ["CR"]', 1)
                    + stat_rule.replace('modalities = ["CR", "DX"]', 'modalities = ["DX"]') + 'priority = "stat"\n')
    settings = load_settings(path)
    assert [r.queue_priority for r in settings.rules] == [0, 20]
    routine = receive(settings, chest())
    dx = chest()
    dx.Modality = "DX"
    stat = receive(settings, dx)
    from storage.jobs import claim_next_job

    worker = SynthesisWorker(settings, "test-worker")
    first = claim_next_job(worker.sessions, "test-worker", utcnow() + timedelta(seconds=1))
    assert first is not None and first.input_instance_id == stat and first.priority == 20
    second = claim_next_job(worker.sessions, "test-worker", utcnow() + timedelta(seconds=1))
    assert second is not None and second.input_instance_id == routine


def _batching_site(folder: Path, model: Path) -> Settings:
    folder.mkdir()
    path = node_config(folder, port=11112, model=model, pacs_port=None, settle_s=0, azimuths="[-30, 30, 90]")
    path.write_text(path.read_text().replace("max_attempts = 3", "max_attempts = 3\nmax_jobs_per_batch = 4"))
    return load_settings(path)


def _derived_pixels(worker: SynthesisWorker) -> dict[str, bytes]:
    with worker.sessions() as session:
        rows = session.query(Instance).filter_by(origin="derived").all()
        return {r.sop_instance_uid: worker.store.open_dataset(r.path).PixelData for r in rows}


def test_jobs_denoised_together_give_the_same_pixels_as_alone(
    tmp_path: Path, tiny_pixel_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="dicomnode.worker")
    inputs = [chest(generate_uid()), chest(generate_uid())]
    together = _batching_site(tmp_path / "together", tiny_pixel_model_dir)
    for ds in inputs:
        receive(together, ds)
    worker = SynthesisWorker(together, "batch-worker")
    assert worker.run_once() is True  # claims both, denoises six views together
    with worker.sessions() as session:
        assert [j.state for j in session.query(Job)] == ["done", "done"]
    assert "denoised together" in caplog.text
    batched = _derived_pixels(worker)

    alone = _batching_site(tmp_path / "alone", tiny_pixel_model_dir)
    single = SynthesisWorker(alone, "batch-worker")
    for ds in inputs:
        receive(alone, ds)
        assert single.run_once() is True and single.run_once() is False
    assert len(batched) == 6 and _derived_pixels(single) == batched, "bit-identical, alone or together"


def test_a_worker_whose_job_moved_writes_nothing_and_does_not_crash(
    tmp_path: Path, tiny_pixel_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from storage.jobs import claim_jobs, lease_of, requeue_running_jobs

    settings = settings_for(tmp_path, tiny_pixel_model_dir)
    receive(settings, chest())
    worker = SynthesisWorker(settings, "slow-worker")
    [job] = claim_jobs(worker.sessions, "slow-worker")
    worker.leases = {job.id: lease_of(job)}
    with worker.sessions.begin() as session:  # meanwhile the node restarted, or an operator moved it
        assert requeue_running_jobs(session, claimed_by="slow-worker") == 1
    files_before = sorted(p for p in settings.node.storage_dir.rglob("*.dcm"))
    worker._run_job(job)  # synthesises, then finds at the fence that the job is no longer its own
    assert "dropped by slow-worker" in caplog.text
    with worker.sessions() as session:
        row = session.get_one(Job, job.id)
        assert row.state == "queued" and row.attempts == 0
        assert session.query(Output).count() == 0 and session.query(Delivery).count() == 0
    assert sorted(p for p in settings.node.storage_dir.rglob("*.dcm")) == files_before, "no output file written"
    assert worker.run_once() is True  # the next claim is a fresh lease: the job now runs normally
    with worker.sessions() as session:
        assert session.get_one(Job, job.id).state == "done"
