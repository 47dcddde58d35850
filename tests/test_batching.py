"""Several requests in one batch give each view the pixels of its request run alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dicomnode.errors import SynthesisError
from synthesis import SvdrrPipeline
from synthesis.batching import Request, synthesize_requests
from synthesis.fastpath import FastPath, enable_fast_path

STEPS = 3


def _image(phase: float, size: int = 32) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size] / size
    return np.clip(0.5 + 0.3 * np.sin(6 * x + phase) * np.cos(4 * y), 0, 1).astype(np.float32)


@pytest.fixture(scope="module")
def pipe(tiny_model_dir: Path) -> SvdrrPipeline:
    p = SvdrrPipeline.from_pretrained(tiny_model_dir)
    p.set_progress_bar_config(disable=True)
    enable_fast_path(p, FastPath(pad_batches=True))
    return p


REQUESTS = [
    Request(_image(0.0), [-90, 30, 60], seed=1),
    Request(_image(1.0), [45], elevations=[10], seed=2),
    Request(_image(2.0), [-30, 0, 30, 90], seed=1),
]


@pytest.mark.parametrize("max_batch", [3, 8])
def test_each_request_gets_what_it_gets_alone(pipe: SvdrrPipeline, max_batch: int) -> None:
    together = synthesize_requests(pipe, REQUESTS, num_inference_steps=STEPS, guidance_scale=3.0, max_batch=max_batch)
    assert [o.images.shape[0] for o in together] == [3, 1, 4]
    for request, out in zip(REQUESTS, together, strict=True):
        alone = pipe(
            request.image,
            azimuths=request.azimuths,
            elevations=request.elevations,
            num_inference_steps=STEPS,
            guidance_scale=3.0,
            generator=request.seed,
        )
        np.testing.assert_allclose(out.images, alone.images, atol=1e-5)
        assert out.views == alone.views and out.seeds == alone.seeds
    # The inputs differ, so their conditions do: the same angle and seed give different pixels.
    assert np.abs(together[0].images[1] - together[2].images[2]).max() > 1e-3  # az 30, seed 1, two inputs


def test_requests_must_share_a_size(pipe: SvdrrPipeline) -> None:
    with pytest.raises(SynthesisError, match="one image size"):
        synthesize_requests(pipe, [Request(_image(0), [10]), Request(_image(0, size=64), [10])])
    assert synthesize_requests(pipe, []) == []
