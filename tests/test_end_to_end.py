"""The node as a user meets it: dcmtk storescu -> node (subprocess) -> a real Orthanc.

A tiny randomly initialised model in the published layout stands in for real weights (built by a
fixture here, never a default). Every derived instance Orthanc holds is fetched back, checked
attribute by attribute and validated with dciodvfy; the provenance command must show the chain.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from dicomnode.derived import device_uid_for
from storage.db import make_engine, session_factory
from storage.models import Delivery, Instance, Job
from tests.conftest import free_port
from tests.peers import NodeProcess, Orthanc, node_config, run_cli, storescu, wait_for
from tests.test_derived import dciodvfy_errors
from tests.tiny_model import make_tiny_model

pytestmark = pytest.mark.slow

AZIMUTHS = [-90.0, -30.0, 30.0, 90.0]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("e2e-model"), resolution=64)


@pytest.fixture(scope="module")
def model_identity(model_dir: Path) -> str:
    from synthesis import SvdrrPipeline

    return SvdrrPipeline.from_pretrained(model_dir).model_identity


@pytest.fixture()
def orthanc(tmp_path: Path):  # noqa: ANN201
    pacs = Orthanc(tmp_path / "orthanc").start()
    yield pacs
    pacs.stop()


def chest_cr(folder: Path, n: int = 1) -> list[Path]:
    """Copies of pydicom-data's real chest PA CR, each a new instance (own SOP Instance UID)."""
    source = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    paths = []
    for i in range(n):
        ds = source.copy()
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = folder / f"cr{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def sessions_for(config_folder: Path):  # noqa: ANN201
    return session_factory(make_engine(f"sqlite:///{config_folder / 'var' / 'dicomnode.sqlite'}"))


def test_storescu_to_node_to_orthanc(tmp_path: Path, orthanc: Orthanc, model_dir: Path, model_identity: str) -> None:
    port = free_port()
    config = node_config(tmp_path, port=port, model=model_dir, pacs_port=orthanc.dicom_port)
    node = NodeProcess(config, port, tmp_path / "node.log").start()
    try:
        (cr,) = chest_cr(tmp_path)
        source = pydicom.dcmread(cr)
        sent = storescu(port, [cr])
        assert sent.returncode == 0, sent.stderr

        def derived_series() -> list[dict] | None:
            studies = orthanc.get("/studies?expand")
            series = [orthanc.get(f"/series/{s}") for st in studies for s in st["Series"]]
            synthetic = [s for s in series if s["MainDicomTags"].get("SeriesNumber") == "901"]
            return synthetic if synthetic and len(synthetic[0]["Instances"]) == len(AZIMUTHS) else None

        (series,) = wait_for(derived_series, 120, "the derived series in Orthanc", interval_s=0.5)
        studies = orthanc.get("/studies?expand")
        assert len(studies) == 1, "the derived series must sit in the source's study, not a new one"
        assert studies[0]["MainDicomTags"]["StudyInstanceUID"] == source.StudyInstanceUID
        assert "SYNTHETIC" in series["MainDicomTags"]["SeriesDescription"]

        outputs = []
        for instance_id in series["Instances"]:
            data = orthanc.get(f"/instances/{instance_id}/file")
            path = tmp_path / f"out-{instance_id}.dcm"
            path.write_bytes(data)
            ds = pydicom.dcmread(io.BytesIO(data))
            outputs.append(ds)
            errors, report = dciodvfy_errors(path)
            assert not errors, report
            assert orthanc.get(f"/instances/{instance_id}/preview")[:8] == b"\x89PNG\r\n\x1a\n"
        for ds in outputs:
            assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
            assert ds.SyntheticData == "YES" and ds.ConversionType == "SYN" and ds.Modality == "OT"
            assert ds.ImageType[0] == "DERIVED"
            for keyword in ("PatientID", "PatientName", "StudyInstanceUID", "AccessionNumber", "StudyDate"):
                assert ds.get(keyword) == source.get(keyword), keyword
            assert ds.SeriesInstanceUID != source.SeriesInstanceUID
            assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
            synthesizing = [
                item
                for item in ds.ContributingEquipmentSequence
                if item.PurposeOfReferenceCodeSequence[0].CodeValue == "109100"
            ]
            assert len(synthesizing) == 1 and synthesizing[0].DeviceUID == device_uid_for(model_identity)
            assert "not" in ds.ImageComments.lower()
        assert len({ds.SOPInstanceUID for ds in outputs}) == len(AZIMUTHS)

        # Provenance from the database and through the command line.
        with sessions_for(tmp_path)() as session:
            received = session.query(Instance).filter_by(sop_instance_uid=source.SOPInstanceUID).one()
            assert received.origin == "received" and received.calling_ae == "TESTSCU"
            assert session.query(Job).filter_by(input_instance_id=received.id, state="done").count() == 1
            deliveries = session.query(Delivery).all()
            assert len(deliveries) == len(AZIMUTHS) and {d.state for d in deliveries} == {"sent"}
            assert {d.status_code for d in deliveries} == {0}
        chain = run_cli("provenance", source.SOPInstanceUID, "--config", str(config))
        assert chain.returncode == 0, chain.stderr
        assert "TESTSCU -> SVDRR" in chain.stdout and chain.stdout.count("-> pacs") == len(AZIMUTHS)
        assert model_identity[:16] in chain.stdout and "status 0x0000" in chain.stdout
        out_chain = run_cli("provenance", outputs[0].SOPInstanceUID, "--config", str(config))
        assert "SYNTHETIC output" in out_chain.stdout and source.SOPInstanceUID in out_chain.stdout

        # Re-sending the same instance changes nothing: same job, no second series.
        assert storescu(port, [cr]).returncode == 0
        status = run_cli("status", "--config", str(config))
        assert "answering C-ECHO" in status.stdout and "done 1" in status.stdout, status.stdout
    finally:
        code = node.terminate() if node.proc and node.proc.poll() is None else node.proc.returncode
        node.stop()
    assert code == 0, node.log()
    assert len(orthanc.get("/series")) == 1  # only the derived series went to the PACS, nothing twice
    # Library chatter (highdicom: seven INFO lines per output; pynetdicom: one per message) stays out.
    assert "INFO dicomnode.worker" in node.log() and "dicomnode.scu" in node.log()
    assert " highdicom." not in node.log() and " pynetdicom." not in node.log()


def test_hard_kill_with_queued_jobs_then_restart_completes_everything(
    tmp_path: Path, orthanc: Orthanc, model_dir: Path
) -> None:
    port = free_port()
    # A long settle delay keeps the jobs queued when the node is killed.
    config = node_config(tmp_path, port=port, model=model_dir, pacs_port=orthanc.dicom_port, settle_s=600)
    node = NodeProcess(config, port, tmp_path / "node.log").start()
    files = chest_cr(tmp_path, n=3)
    try:
        assert storescu(port, files).returncode == 0
        node.kill_hard()
    finally:
        node.stop()
    uids = {pydicom.dcmread(f).SOPInstanceUID for f in files}
    with sessions_for(tmp_path)() as session:
        rows = session.query(Instance).filter(Instance.sop_instance_uid.in_(uids)).all()
        assert len(rows) == 3, "every acknowledged instance is recorded"
        for row in rows:
            stored = pydicom.dcmread(tmp_path / "var" / row.path)
            assert stored.SOPInstanceUID == row.sop_instance_uid
        assert {j.state for j in session.query(Job).all()} == {"queued"}

    config = node_config(tmp_path, port=port, model=model_dir, pacs_port=orthanc.dicom_port, settle_s=0)
    with sessions_for(tmp_path).begin() as session:  # the restart's settings would apply to new jobs only
        for job in session.query(Job).all():
            job.not_before = job.created_at
    node = NodeProcess(config, port, tmp_path / "node2.log").start()
    try:

        def all_delivered() -> bool:
            with sessions_for(tmp_path)() as session:
                jobs = session.query(Job).all()
                sent = session.query(Delivery).filter_by(state="sent").count()
                return all(j.state == "done" for j in jobs) and sent == 3 * len(AZIMUTHS)

        wait_for(all_delivered, 180, "all jobs done and delivered after the restart", interval_s=0.5)
    finally:
        node.stop()
    assert len(orthanc.get("/series")) == 3


def test_missing_model_still_receives_and_queues(tmp_path: Path) -> None:
    """A model folder still to come (it exists, no model_index.json yet): receive, store, queue, wait.
    A folder that does not exist at all is a configuration error (tests/test_model_location.py)."""
    port = free_port()
    (tmp_path / "model-to-come").mkdir()
    config = node_config(tmp_path, port=port, model=tmp_path / "model-to-come", pacs_port=None, settle_s=0)
    node = NodeProcess(config, port, tmp_path / "node.log").start()
    try:
        (cr,) = chest_cr(tmp_path)
        assert storescu(port, [cr]).returncode == 0

        def waiting() -> bool:
            with sessions_for(tmp_path)() as session:
                return session.query(Job).filter_by(state="waiting_model").count() == 1

        wait_for(waiting, 60, "the job to wait for the model")
        status = run_cli("status", "--config", str(config))
        assert "synthesis waits for a model" in status.stdout, status.stdout
        assert "waiting_model 1" in status.stdout
        assert "synthesis waits for a model" in node.log()
    finally:
        node.stop()


def test_own_output_sent_back_is_stored_but_not_processed(tmp_path: Path, model_dir: Path) -> None:
    """PACS routes often send our output back: stored, never a new job (loop prevention)."""
    port = free_port()
    config = node_config(tmp_path, port=port, model=model_dir, pacs_port=None, settle_s=0, azimuths="[30]")
    node = NodeProcess(config, port, tmp_path / "node.log").start()
    try:
        (cr,) = chest_cr(tmp_path)
        assert storescu(port, [cr]).returncode == 0

        def derived_path() -> str | None:
            with sessions_for(tmp_path)() as session:
                row = session.query(Instance).filter_by(origin="derived").first()
                return row.path if row else None

        path = wait_for(derived_path, 90, "the derived instance")
        own = tmp_path / "own.dcm"
        shutil.copy(tmp_path / "var" / path, own)
        ds = pydicom.dcmread(own)
        ds.Modality = "CR"  # even if a router rewrote the modality so the rule would match
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()  # and re-identified it
        ds.save_as(own, enforce_file_format=True)
        assert storescu(port, [own]).returncode == 0
        with sessions_for(tmp_path)() as session:
            assert session.query(Job).count() == 1
    finally:
        node.stop()
