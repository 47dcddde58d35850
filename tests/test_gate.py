"""The consistency gate with the real demo model, and which failures are retried.

The shipped sample must pass; a uniform image and pydicom's real chest CRs (uncompressed and
JPEG 2000, MONOCHROME1) must be refused: job ``refused``, nothing written, nothing to deliver, the
score and the reason in ``dicomnode jobs`` and ``dicomnode provenance``. The assertions are on
passed/refused, never on exact scores, so they hold for any demo model shipped later.
"""

from __future__ import annotations

import json
import shutil
from datetime import timedelta
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless, generate_uid

from dicomnode.cli import main
from dicomnode.config import Settings, load_settings
from dicomnode.errors import (
    ConfigError,
    DicomInputError,
    InputRefused,
    ModelLoadError,
    StorageError,
    SynthesisError,
    is_permanent,
)
from dicomnode.gate import check_score, intended_input_problem, model_meta_for
from dicomnode.worker import SynthesisWorker
from storage.models import Delivery, Instance, Job, Output, utcnow
from synthesis.model_meta import DEFAULT_META, META_FILENAME, load_model_meta
from tests.conftest import free_port
from tests.peers import node_config
from tests.test_worker import receive, run_job

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "models" / "demo"
SAMPLE = DEMO / "sample" / "chest_pa_drr_phantom.dcm"


def gate_settings(tmp_path: Path, model: Path = DEMO, rule_extra: str = "", threshold: str = "") -> Path:
    """A node configuration with the demo model and a destination, so deliveries would be queued."""
    config = node_config(
        tmp_path, port=free_port(), model=model, pacs_port=free_port(), settle_s=0, azimuths="[-30, 30]",
        rule_extra=rule_extra,
    )  # fmt: skip
    if threshold:
        text = config.read_text().replace("[engine]\n", f"[engine]\nconsistency_threshold = {threshold}\n")
        config.write_text(text)
    return config


def fresh(ds: pydicom.Dataset) -> pydicom.Dataset:
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return ds


def sample() -> pydicom.Dataset:
    return fresh(pydicom.dcmread(SAMPLE))


def uniform() -> pydicom.Dataset:
    """The sample's header with a uniform mid-grey image: nothing for a model to ground."""
    ds = sample()
    ds.PixelData = np.full((ds.Rows, ds.Columns), 2**int(ds.BitsStored) // 2, np.uint16).tobytes()
    return ds


def real_cr(name: str) -> pydicom.Dataset:
    return fresh(pydicom.dcmread(get_testdata_file(name)))


def test_the_shipped_sample_passes_and_its_score_is_recorded_and_shown(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = gate_settings(tmp_path)
    settings = load_settings(config)
    worker, job = run_job(settings, sample())
    assert job.state == "done", job.last_error
    meta = load_model_meta(DEMO)
    assert job.consistency_method == meta.gate.method
    assert job.consistency_score is not None and job.consistency_score >= meta.gate.threshold
    with worker.sessions() as session:
        assert session.query(Output).count() == 2
        assert session.query(Delivery).count() == 2  # one per view, to the one destination
    assert main(["jobs", "--config", str(config)]) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.strip().startswith(str(job.id))][0]
    assert "done" in line and f"{job.consistency_score:.2f}" in line
    source_uid = job.input_instance_id
    with worker.sessions() as session:
        uid = session.get(Instance, source_uid).sop_instance_uid
    assert main(["provenance", "--config", str(config), uid]) == 0
    assert f"consistency {meta.gate.method} {job.consistency_score:.2f}" in capsys.readouterr().out


@pytest.mark.parametrize(
    "make",
    [uniform, lambda: real_cr("RG1_UNCR.dcm"), lambda: real_cr("RG1_J2KR.dcm")],
    ids=["uniform", "RG1_UNCR real chest CR", "RG1_J2KR real chest CR JPEG 2000 MONOCHROME1"],
)
def test_inputs_the_model_cannot_ground_are_refused_and_nothing_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make
) -> None:  # noqa: ANN001
    config = gate_settings(tmp_path)
    settings = load_settings(config)
    ds = make()
    worker, job = run_job(settings, ds)
    assert job.state == "refused", job.last_error
    assert job.attempts == 1 and job.finished_at is not None
    assert "consistency score" in job.last_error and "below the model's threshold" in job.last_error
    assert job.consistency_score is not None and job.consistency_score < load_model_meta(DEMO).gate.threshold
    with worker.sessions() as session:
        assert session.query(Output).count() == 0
        assert session.query(Delivery).count() == 0
        assert session.query(Instance).filter_by(origin="derived").count() == 0
    stored = [p for p in (settings.node.storage_dir).rglob("*") if p.is_file() and "sqlite" not in p.name]
    assert len(stored) == 1, f"only the received input is in the store: {stored}"
    # Never retried: nothing is due, and an operator's retry is refused too.
    with worker.sessions.begin() as session:
        session.query(Job).update({"not_before": utcnow() - timedelta(seconds=1)})
    assert worker.run_once() is False
    assert main(["jobs", "--config", str(config), "--retry", str(job.id)]) != 0
    capsys.readouterr()
    assert main(["jobs", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    line = [x for x in out.splitlines() if x.strip().startswith(str(job.id))][0]
    assert "refused" in line and f"{job.consistency_score:.2f}" in line and "below the model's threshold" in line
    assert main(["provenance", "--config", str(config), ds.SOPInstanceUID]) == 0
    out = capsys.readouterr().out
    assert "state refused" in out and "REFUSED, nothing written or sent" in out
    assert f"{job.consistency_score:.2f}" in out
    assert main(["status", "--config", str(config)]) == 4  # no node runs here: status says so (exit 4)
    out = capsys.readouterr().out
    assert "refused 1" in out and f"last refused: job {job.id}" in out


def test_header_outside_the_intended_inputs_is_refused_before_any_pixel_work(tmp_path: Path) -> None:
    settings = load_settings(gate_settings(tmp_path))
    ds = real_cr("RG3_UNCR.dcm")  # a real CR of an extremity, AP
    ds.PixelData = b"\x00" * 16  # not even decodable: the header alone decides
    worker, job = run_job(settings, ds)
    assert job.state == "refused" and "BodyPartExamined EXTREMITY" in job.last_error
    assert job.consistency_score is None


def test_elevations_outside_the_trained_range_are_refused(tmp_path: Path) -> None:
    settings = load_settings(gate_settings(tmp_path, rule_extra="elevations = [0, 40]"))
    worker, job = run_job(settings, sample())
    assert job.state == "refused" and "elevation 40 is outside the model's trained range -30..30" in job.last_error


def test_site_threshold_overrides_the_model(tmp_path: Path) -> None:
    settings = load_settings(gate_settings(tmp_path, threshold="99.0"))
    assert settings.engine.consistency_threshold == 99.0
    worker, job = run_job(settings, sample())
    assert job.state == "refused" and "threshold 99.00" in job.last_error
    (tmp_path / "bad").mkdir()
    with pytest.raises(ConfigError, match="consistency_threshold"):
        load_settings(gate_settings(tmp_path / "bad", threshold='"high"'))


def test_a_model_without_metadata_is_not_calibrated_and_refuses(tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(DEMO, model, ignore=shutil.ignore_patterns(META_FILENAME, "evaluation", "sample"))
    assert load_model_meta(model) == DEFAULT_META and DEFAULT_META.gate.threshold is None
    settings = load_settings(gate_settings(tmp_path, model=model))
    worker, job = run_job(settings, sample())
    assert job.state == "refused" and "not calibrated" in job.last_error
    assert job.consistency_score is not None  # scored all the same, for the operator to calibrate


def test_undecodable_pixels_fail_after_exactly_one_attempt(tmp_path: Path) -> None:
    settings = load_settings(gate_settings(tmp_path))
    ds = sample()
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51 this is not a JPEG 2000 codestream"])
    worker, job = run_job(settings, ds)
    assert job.state == "failed" and job.attempts == 1
    assert job.last_error.startswith("SynthesisError") and "could not be decoded" in job.last_error
    with worker.sessions.begin() as session:
        session.query(Job).update({"not_before": utcnow() - timedelta(seconds=1)})
    assert worker.run_once() is False  # nothing left to retry


def test_a_transient_fault_uses_the_retry_budget_then_succeeds(tmp_path: Path) -> None:
    import torch

    settings = load_settings(gate_settings(tmp_path))
    receive(settings, sample())
    worker = SynthesisWorker(settings, "w")
    model = worker.load_model()
    real = model.pipe

    class OutOfMemoryOnce:  # fault injection: the first synthesis runs out of GPU memory
        failed = False

        def __getattr__(self, name: str) -> object:
            return getattr(real, name)

        def __call__(self, *args: object, **kwargs: object) -> object:
            if not OutOfMemoryOnce.failed:
                OutOfMemoryOnce.failed = True
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return real(*args, **kwargs)

    model.pipe = OutOfMemoryOnce()
    assert worker.run_once() is True
    with worker.sessions.begin() as session:
        job = session.query(Job).one()
        assert job.state == "queued" and job.attempts == 1 and "OutOfMemoryError" in job.last_error
        job.not_before = utcnow() - timedelta(seconds=1)
    assert worker.run_once() is True
    with worker.sessions() as session:
        job = session.query(Job).one()
        assert job.state == "done" and job.attempts == 1 and session.query(Output).count() == 2


def test_the_score_ranks_the_sample_and_its_mirror_image_far_above_a_real_cr_and_a_uniform_image() -> None:
    """The score measures grounding: the model's own chest and its mirror image (the demo model was
    trained on mirrored patients too, so a mirrored chest is an input it can read) pass the gate;
    a real CR and a uniform image score far lower and are refused."""
    from synthesis.consistency import denoising_score
    from synthesis.pipeline import SvdrrPipeline
    from synthesis.radiograph import prepare_radiograph

    pipe = SvdrrPipeline.from_pretrained(DEMO)
    threshold = load_model_meta(DEMO).gate.threshold
    image = prepare_radiograph(pydicom.dcmread(SAMPLE), pipe.resolution).image
    cr = prepare_radiograph(real_cr("RG1_UNCR.dcm"), pipe.resolution).image
    own = denoising_score(pipe, image)
    assert own.value == denoising_score(pipe, image).value, "deterministic: a retry gets the same score"
    mirrored = denoising_score(pipe, image[:, ::-1].copy()).value
    refused = [denoising_score(pipe, cr).value, denoising_score(pipe, np.full_like(image, 0.5)).value]
    assert min(own.value, mirrored) > threshold > max(refused) + 3.0, (own.value, mirrored, threshold, refused)


def test_intended_inputs_match_as_rules_do() -> None:
    meta = load_model_meta(DEMO)
    ds = pydicom.dcmread(SAMPLE, stop_before_pixels=True)
    assert intended_input_problem(ds, [0.0], meta) is None
    del ds.ViewPosition
    assert intended_input_problem(ds, [0.0], meta) is None  # "" in the list admits an absent value
    ds.Modality = "MR"
    assert "Modality MR is outside" in intended_input_problem(ds, [0.0], meta)
    ds.Modality, ds.PhotometricInterpretation = "DX", "RGB"
    assert "PhotometricInterpretation RGB" in intended_input_problem(ds, [0.0], meta)
    ds.PhotometricInterpretation, ds.Rows = "MONOCHROME2", 32
    assert "smaller than the model's minimum" in intended_input_problem(ds, [0.0], meta)
    with pytest.raises(InputRefused, match="below the model's threshold") as refused:
        check_score(meta.gate.threshold - 0.01, "denoise", meta)
    assert refused.value.score == pytest.approx(meta.gate.threshold - 0.01)


def test_malformed_metadata_is_a_model_problem(tmp_path: Path) -> None:
    (tmp_path / META_FILENAME).write_text(json.dumps({"gate": {"method": "guess", "threshold": 1}}))
    with pytest.raises(ModelLoadError, match="gate.method"):
        model_meta_for(tmp_path)
    (tmp_path / META_FILENAME).write_text("{not json")
    with pytest.raises(ModelLoadError, match="JSON"):
        model_meta_for(tmp_path)


def test_permanent_and_transient_errors() -> None:
    import torch
    from sqlalchemy.exc import OperationalError

    for permanent in (SynthesisError("x"), DicomInputError("x"), ConfigError("x"), InputRefused("x")):
        assert is_permanent(permanent)
    for transient in (
        ModelLoadError("x"),
        StorageError("x"),
        MemoryError(),
        torch.OutOfMemoryError("x"),
        RuntimeError("CUDA error: an illegal memory access"),
        OperationalError("UPDATE jobs", {}, Exception("database is locked")),
    ):
        assert not is_permanent(transient)


def identity_settings(folder: Path, model: Path) -> Settings:
    """The identity view depends on the sampler (unlike the denoising score): the demo's own settings."""
    folder.mkdir()
    config = gate_settings(folder, model=model)
    # The model's recommended steps and guidance, as the shipped configuration uses them.
    config.write_text(config.read_text().replace("steps = 2\n", 'steps = ""\n').replace("= 3.0\n", '= ""\n'))
    return load_settings(config)


def test_identity_view_method_scores_the_identity_view_synthesised_with_the_job(tmp_path: Path) -> None:
    """The simpler score: SSIM of the identity view (0, 0), made in the same batch, against the input."""
    model = tmp_path / "model"
    shutil.copytree(DEMO, model, ignore=shutil.ignore_patterns("evaluation", "sample"))
    meta = json.loads((model / META_FILENAME).read_text())
    meta["gate"] = {"method": "identity-ssim", "threshold": 0.6}  # the sample scores 0.72, uniform grey 0.47
    (model / META_FILENAME).write_text(json.dumps(meta))
    settings = identity_settings(tmp_path / "a", model)
    worker, job = run_job(settings, sample())
    assert job.state == "done" and job.consistency_method == "identity-ssim" and job.consistency_score >= 0.6
    with worker.sessions() as session:
        assert sorted(o.azimuth for o in session.query(Output)) == [-30.0, 30.0], "the identity view is not written"
    settings = identity_settings(tmp_path / "b", model)
    worker, job = run_job(settings, uniform())
    assert job.state == "refused" and job.consistency_score < 0.6 and "identity-ssim" in job.last_error
