"""Cross-job batching (synthesis/batching.py): a view's pixels are bit-identical whether its job is
denoised alone or together with other jobs, at any position, on CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from synthesis.batching import BatchRequest, synthesize_many

STEPS = 3


@pytest.fixture(scope="module", params=["pixel", "latent"])
def pipe(request: pytest.FixtureRequest, tiny_pixel_model_dir: Path, tiny_model_dir: Path):  # noqa: ANN201
    from synthesis.pipeline import SvdrrPipeline

    folder = tiny_pixel_model_dir if request.param == "pixel" else tiny_model_dir
    p = SvdrrPipeline.from_pretrained(folder)
    p.set_progress_bar_config(disable=True)
    return p


def _request(pipe, n: int, azimuths: list[float], seed: int = 0) -> BatchRequest:  # noqa: ANN001
    r = pipe.resolution
    image = np.random.default_rng(n).random((r, r)).astype(np.float32)
    return BatchRequest(image=image, azimuths=azimuths, elevations=None, seed=seed)


def test_each_view_is_bit_identical_alone_or_batched_with_other_jobs(pipe) -> None:  # noqa: ANN001
    a = _request(pipe, 1, [-30, 30, 90])
    b = _request(pipe, 2, [-90, 45], seed=7)
    c = _request(pipe, 3, [10, 20, 60, 80, 15])
    kwargs = {"num_inference_steps": STEPS, "guidance_scale": 3.0, "max_batch": 4}
    [alone_a] = synthesize_many(pipe, [a], **kwargs)
    [alone_b] = synthesize_many(pipe, [b], **kwargs)
    together = synthesize_many(pipe, [c, b, a], **kwargs)  # a's views now straddle two chunks
    assert np.array_equal(together[2].images, alone_a.images)
    assert np.array_equal(together[1].images, alone_b.images)
    assert [v.azimuth for v in together[2].views] == [-30, 30, 90]
    assert together[2].seeds == alone_a.seeds
    # Not a trivial equality: the images depend on the input, the view and the seed.
    assert not np.array_equal(alone_a.images[0], alone_a.images[1])
    assert not np.array_equal(together[0].images[0], alone_a.images[0])


def test_batched_views_match_the_pipeline_call_closely(pipe) -> None:  # noqa: ANN001
    """Padding to fixed batches changes kernels' shapes, not the maths: the plain call agrees."""
    a = _request(pipe, 1, [-30, 30, 90])
    [batched] = synthesize_many(pipe, [a], num_inference_steps=STEPS, guidance_scale=3.0, max_batch=8)
    plain = pipe(a.image, azimuths=a.azimuths, num_inference_steps=STEPS, guidance_scale=3.0, generator=0)
    np.testing.assert_allclose(batched.images, plain.images, atol=1e-4)
