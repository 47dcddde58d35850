"""A rule with ``sweep = true``: the worker writes the rotation sweep along with the single views."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dicomnode.config import load_settings
from dicomnode.errors import ConfigError
from dicomnode.rules import Rule
from storage.models import Instance, Output
from tests.peers import node_config
from tests.test_derived import dciodvfy_errors
from tests.test_worker import chest, run_job

MF_WORD_SC = "1.2.840.10008.5.1.4.1.1.7.3"


def test_sweep_rule_adds_one_multiframe_instance_per_request(tmp_path: Path, tiny_pixel_model_dir: Path) -> None:
    model, views = tiny_pixel_model_dir, "[30, -30, 0]"
    config = node_config(tmp_path, port=11112, model=model, pacs_port=None, settle_s=0, azimuths=views)
    config.write_text(config.read_text() + "sweep = true\n")  # the rule is the file's last table
    settings = load_settings(config)
    assert settings.rules[0].sweep is True
    worker, job = run_job(settings, chest())
    assert job.state == "done", job.last_error
    with worker.sessions() as session:
        derived = session.query(Instance).filter_by(origin="derived").all()
        sweeps = [d for d in derived if d.sop_class_uid == MF_WORD_SC]
        singles = [d for d in derived if d.sop_class_uid != MF_WORD_SC]
        assert len(sweeps) == 1 and len(singles) == 3
        assert sweeps[0].study_instance_uid == singles[0].study_instance_uid
        assert sweeps[0].series_instance_uid != singles[0].series_instance_uid
        output = session.query(Output).filter_by(instance_id=sweeps[0].id).one()
        assert output.job_id == job.id and output.azimuth == -30.0  # the first frame's angles
        sweep = worker.store.open_dataset(sweeps[0].path)
        frames = sweep.pixel_array
        assert frames.shape[0] == 3 and list(sweep.FrameLabelVector) == ["az -30", "az 0", "az 30"]
        assert sweep.SeriesNumber == settings.output.sweep_series_number == 902
        for index, azimuth in enumerate((-30.0, 0.0, 30.0)):
            single = next(
                worker.store.open_dataset(d.path)
                for d in singles
                if session.query(Output).filter_by(instance_id=d.id).one().azimuth == azimuth
            )
            assert np.array_equal(frames[index], single.pixel_array)
        errors, text = dciodvfy_errors(worker.store.absolute(sweeps[0].path))
        assert not errors, text


def test_sweep_key_is_checked() -> None:
    with pytest.raises(ConfigError, match="sweep: must be true or false"):
        Rule(name="r", azimuths=(10.0, 20.0), sweep="yes")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="at least two views"):
        Rule(name="r", azimuths=(10.0,), sweep=True)
    assert Rule(name="r", azimuths=(10.0,)).sweep is False


def test_output_series_numbers_for_sweep_and_recall_are_checked(tmp_path: Path) -> None:
    config = node_config(tmp_path, port=11112, model=tmp_path, pacs_port=None)
    settings = load_settings(config)
    assert (settings.output.sweep_series_number, settings.output.recall_series_number) == (902, 990)
    assert settings.output.sweep_frame_time_ms == 250.0
    text = config.read_text() + "\n[output]\nrecall_series_number = 12\n"
    config.write_text(text)
    with pytest.raises(ConfigError, match="output.recall_series_number"):
        load_settings(config)
