"""The node on the fast path: the worker warms the model up at load, batches with padding, and
``dicomnode status`` reports the per-view synthesis time of the device that made the outputs."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from dicomnode.cli import main
from dicomnode.cli.exitcodes import ExitCode
from dicomnode.config import load_settings
from dicomnode.worker import SynthesisWorker
from storage.models import Job, Output
from synthesis.fastpath import FastPath
from tests.conftest import free_port
from tests.peers import node_config
from tests.test_worker import chest, receive


def test_worker_warms_up_at_load_and_runs_jobs_padded(
    tmp_path: Path, tiny_pixel_model_dir: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    path = node_config(
        tmp_path, port=free_port(), model=tiny_pixel_model_dir, pacs_port=None, settle_s=0, azimuths="[-30, 30, 90]"
    )
    settings = load_settings(path, env={"DICOMNODE_ENGINE__MAX_BATCH": "auto"})
    assert main(["db", "upgrade", "--config", str(path)]) == ExitCode.OK
    assert main(["status", "--config", str(path)]) == ExitCode.PEER_UNREACHABLE  # no node runs: status says so
    assert "no synthesised views yet" in capsys.readouterr().out
    receive(settings, chest())
    worker = SynthesisWorker(settings, "fast-worker")
    with caplog.at_level(logging.INFO):
        model = worker.load_model()
    assert model.max_batch == 8  # "auto" on the CPU
    # compile "auto" is off on the CPU, and so is padding; the rule's 3 views were warmed at load.
    assert model.pipe.fast_path == FastPath(compile=False, pad_batches=False)
    assert "warm-up: batch 3 at 64 px" in caplog.text and "max_batch 8" in caplog.text
    rows: list[int] = []
    model.pipe.transformer.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    assert worker.run_once() is True
    # First the consistency gate's denoising score (one call, 3 noise levels), then the 3 views and
    # their CFG pairs in one batch.
    assert rows[0] == 3 and rows[1:] and set(rows[1:]) == {6}
    with worker.sessions() as session:
        assert session.query(Job).one().state == "done"
        outputs = session.query(Output).all()
        assert len(outputs) == 3 and all(o.synthesis_s and o.synthesis_s > 0 for o in outputs)
        per_view = outputs[0].synthesis_s
    capsys.readouterr()
    assert main(["status", "--config", str(path)]) == ExitCode.PEER_UNREACHABLE  # no node runs: status says so
    out = capsys.readouterr().out
    assert f"speed    {per_view:.3f} s per view on cpu float32 (current device; median of the last 3 views)" in out


def test_status_lists_each_recent_device_newest_first(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from storage.db import make_engine, session_factory
    from storage.jobs import enqueue_job
    from storage.outputs import record_output
    from tests.test_cli_operations import _instance

    path = node_config(tmp_path, port=free_port(), model=tmp_path / "model", pacs_port=None)
    assert main(["db", "upgrade", "--config", str(path)]) == ExitCode.OK
    sessions = session_factory(make_engine(f"sqlite:///{tmp_path / 'var' / 'dicomnode.sqlite'}"))
    with sessions.begin() as session:
        source = _instance(session, "1.2.3.4.5", "received")
        job = enqueue_job(
            session,
            input_instance_id=source.id,
            rule_name="chest",
            azimuths=[30],
            elevations=[0],
            destinations=[],
            request_key="k",
        )
        common = {
            "job_id": job.id,
            "azimuth": 30.0,
            "elevation": 0.0,
            "seed": 0,
            "model_name": "m",
            "model_identity": "0" * 64,
            "model_version": "0" * 12,
            "steps": 20,
            "guidance_scale": 3.0,
            "sampler": "s",
            "series_instance_uid": "1.2.3.9",
        }
        made = [("cpu", "float32", 2.0), ("cpu", "float32", 4.0)] + [("cuda:0", "bfloat16", s) for s in (0.05, 0.07)]
        for i, (device, dtype, seconds) in enumerate(made):
            out = _instance(session, f"1.2.3.4.6.{i}", "derived")
            record_output(
                session, instance_id=out.id, device=device, dtype=dtype, synthesis_s=seconds, total_s=seconds, **common
            )
    assert main(["status", "--config", str(path)]) == ExitCode.PEER_UNREACHABLE  # no node runs: status says so
    lines = capsys.readouterr().out.splitlines()
    speed = [line for line in lines if "s per view" in line]
    assert speed[0].startswith("speed    0.060 s per view on cuda:0 bfloat16 (current device; median of the last 2")
    assert "3.000 s per view on cpu float32 (earlier; median of the last 2 views)" in speed[1]
