"""The view-aligned condition (synthesis/aligned.py): the squeeze, and a model that takes it,
from the trainer's command line through the pipeline, the job batcher and the consistency gate."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch

from dicomnode.cli.exitcodes import ExitCode
from synthesis.aligned import foreshorten, squeeze_matrices
from synthesis.architecture import build_components, demo
from synthesis.batching import BatchRequest, synthesize_many
from synthesis.consistency import denoising_score
from synthesis.evaluate import foreshortened
from synthesis.pipeline import SvdrrPipeline
from synthesis.views import View
from tests.test_train import _write_dataset


def _pose(azimuth: float, elevation: float = 0.0) -> torch.Tensor:
    return torch.tensor([View(azimuth, elevation).pose()])


def _image(seed: int = 0, shape: tuple[int, int] = (24, 20)) -> np.ndarray:
    return np.random.default_rng(seed).random(shape).astype(np.float32)


@pytest.mark.parametrize("azimuth", [0.0, 20.0, -45.0, 75.0, 90.0])
def test_squeeze_is_the_foreshortened_baseline(azimuth: float) -> None:
    image = _image()
    ours = (foreshorten(torch.from_numpy(image)[None, None] * 2 - 1, _pose(azimuth))[0, 0].numpy() + 1) / 2
    baseline = foreshortened(image, azimuth)  # the same box filter, scaled back to the input's peak
    np.testing.assert_allclose(ours * image.max() / ours.max(), baseline, atol=1e-5)


def test_squeeze_keeps_levels_is_mirror_symmetric_and_tilts_vertically() -> None:
    assert torch.equal(squeeze_matrices(torch.tensor([1.0]), 9)[0], torch.eye(9))
    flat = torch.full((1, 1, 16, 16), 0.4)
    squeezed = foreshorten(flat, _pose(60.0))[0, 0]
    assert torch.allclose(squeezed[:, 6:10], torch.tensor(0.4)), "inside the squeezed body the level stays"
    assert torch.allclose(squeezed[:, :2], torch.tensor(-1.0)), "beyond it, black background"
    x = torch.from_numpy(_image())[None, None] * 2 - 1
    right, left = foreshorten(x.flip(-1), _pose(45.0)), foreshorten(x, _pose(-45.0)).flip(-1)
    torch.testing.assert_close(right, left, atol=1e-6, rtol=0)
    tilted = foreshorten(x, _pose(0.0, 30.0))[0, 0]
    assert torch.allclose(tilted[:, 5], foreshorten(x[..., 5:6], _pose(0.0, 30.0))[0, 0, :, 0], atol=1e-6)
    assert not torch.allclose(tilted, x[0, 0]), "elevation squeezes the height"
    assert torch.allclose(foreshorten(x, _pose(0.0, 0.0)), x, atol=1e-6)


@pytest.fixture(scope="module")
def aligned_pipe() -> SvdrrPipeline:
    return SvdrrPipeline(**build_components(demo(32, layers=2, heads=2, head_dim=16, aligned_condition=True)))


def test_pipeline_gives_each_view_its_own_squeezed_condition(aligned_pipe: SvdrrPipeline) -> None:
    assert aligned_pipe.aligned and aligned_pipe.transformer.config.in_channels == 3
    x = aligned_pipe._image_tensor(_image(1, (32, 32)))
    views = [View(0.0, 0.0), View(60.0, 0.0), View(-30.0, 15.0)]
    cond = aligned_pipe.condition_for(x, views)
    assert cond.shape == (3, 2, 32, 32)
    for i, view in enumerate(views):
        assert torch.equal(cond[i, 0], x[0, 0])
        torch.testing.assert_close(cond[i, 1], foreshorten(x, torch.tensor([view.pose()]))[0, 0])
    seen: list[torch.Tensor] = []
    hook = aligned_pipe.transformer.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    try:
        aligned_pipe(_image(1, (32, 32)), [60.0], num_inference_steps=1, guidance_scale=2.0, generator=0)
    finally:
        hook.remove()
    (model_in,) = seen
    assert model_in.shape == (2, 3, 32, 32), "CFG batch [null, cond] of [noisy | PA | PA squeezed]"
    assert torch.count_nonzero(model_in[0, 1:]) == 0, "the null branch drops both condition channels"
    torch.testing.assert_close(model_in[1, 2], cond[1, 1])


def test_jobs_batched_together_match_the_pipeline_and_the_gate_scores(aligned_pipe: SvdrrPipeline) -> None:
    images = [_image(2, (32, 32)), _image(3, (32, 32))]
    requests = [BatchRequest(img, [30.0, -60.0], [0.0, 15.0], seed=5) for img in images]
    batched = synthesize_many(aligned_pipe, requests, num_inference_steps=2, guidance_scale=1.5, max_batch=3)
    for image, out in zip(images, batched, strict=True):
        alone = aligned_pipe(image, [30.0, -60.0], [0.0, 15.0], num_inference_steps=2, guidance_scale=1.5, generator=5)
        np.testing.assert_allclose(out.images, alone.images, atol=1e-5)
    assert np.isfinite(denoising_score(aligned_pipe, images[0]).value)


def test_cli_trains_an_aligned_demo_model_that_loads_as_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dicomnode.cli.train import register, run

    data = _write_dataset(tmp_path / "drr")
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    common = ["train", "--data", str(data), "--stages", "32:2:2:1e-3", "--device", "cpu", "--no-progress"]
    args = parser.parse_args(
        [*common, "--out", str(tmp_path / "run"), "--arch", "demo", "--shape", "2,2,16,4", "--aligned-condition"]
    )
    assert run(args) == 0
    pipe = SvdrrPipeline.from_pretrained(tmp_path / "run" / "model")
    assert pipe.aligned
    wrong = parser.parse_args([*common, "--out", str(tmp_path / "x"), "--arch", "tiny-pixel", "--aligned-condition"])
    assert run(wrong) == ExitCode.USAGE
    assert "--aligned-condition go with --arch demo" in capsys.readouterr().err
