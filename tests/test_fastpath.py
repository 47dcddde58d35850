"""The engine's fast path on the CPU at tiny size: padded static chunks, compiled modules, warm-up.

Tolerance: the fast path must give each view's pixels within 1e-5 (images in [0, 1]) of the
eager, unpadded path, the same bound the eager path meets between batch sizes on the CPU (float32
GEMMs may round differently with the batch size); Inductor's fused kernels within 1e-4; bfloat16
within 5e-3 mean, 5e-2 max of float32. On a GPU the benchmark reports the difference.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch._dynamo.testing import CompileCounter

from synthesis import SvdrrPipeline
from synthesis.fastpath import (
    CPU_AUTO_BATCH,
    FastPath,
    auto_max_batch,
    batch_that_fits,
    bucket,
    chunk_shapes,
    enable_fast_path,
    plan_chunks,
    prepare_for_serving,
)

STEPS = 3
ATOL = 1e-5
AZIMUTHS = [-90, -60, -30, 30, 60]


def _image(size: int = 32) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size] / size
    return np.clip(0.5 + 0.3 * np.sin(6 * x) * np.cos(4 * y), 0, 1).astype(np.float32)


def _load(folder: Path) -> SvdrrPipeline:
    p = SvdrrPipeline.from_pretrained(folder)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def eager(tiny_model_dir: Path) -> np.ndarray:
    """The reference: the eager pipeline, all five views in one unpadded chunk."""
    pipe = _load(tiny_model_dir)
    return pipe(_image(), azimuths=AZIMUTHS, num_inference_steps=STEPS, generator=5, max_batch=8).images


# ------------------------------------------------------------------------------ chunk plans
def test_plan_chunks_without_padding_is_plain_slicing() -> None:
    assert plan_chunks(5, 2, pad=False) == [(range(0, 2), 2), (range(2, 4), 2), (range(4, 5), 1)]
    assert plan_chunks(3, 8, pad=False) == [(range(0, 3), 3)]


def test_plan_chunks_pads_to_powers_of_two_within_max_batch() -> None:
    assert plan_chunks(6, 8, pad=True) == [(range(0, 6), 8)]
    assert plan_chunks(3, 8, pad=True) == [(range(0, 3), 4)]
    assert plan_chunks(20, 16, pad=True) == [(range(0, 16), 16), (range(16, 20), 4)]
    assert plan_chunks(7, 6, pad=True) == [(range(0, 6), 6), (range(6, 7), 1)]
    for n in range(1, 40):
        for max_batch in (1, 3, 4, 8, 16):
            plan = plan_chunks(n, max_batch, pad=True)
            covered = [i for chunk, _ in plan for i in chunk]
            assert covered == list(range(n))
            for chunk, size in plan:
                assert len(chunk) <= size <= max_batch
                assert size == max_batch or size & (size - 1) == 0
    assert bucket(5, 64) == 8 and bucket(1, 64) == 1 and bucket(33, 16) == 16


def test_chunk_shapes_lists_every_shape_a_request_runs_at() -> None:
    assert chunk_shapes([6], 8, pad=True) == [8]
    assert chunk_shapes([6, 2, 20], 8, pad=True) == [2, 4, 8]
    assert chunk_shapes([6], 4, pad=False) == [2, 4]


def test_auto_batch_fits_memory_and_falls_back_on_cpu(pipe_cpu: SvdrrPipeline) -> None:
    assert batch_that_fits(100 * 2**30, 2**30, cap=64) == 64  # 70 GiB usable, 1 GiB a view: capped
    assert batch_that_fits(10 * 2**30, 2**30) == 4  # 7 views fit -> 4, a power of two
    assert batch_that_fits(2**20, 2**30) == 1  # never below one
    assert auto_max_batch(pipe_cpu, 3.0) == CPU_AUTO_BATCH


@pytest.fixture(scope="module")
def pipe_cpu(tiny_model_dir: Path) -> SvdrrPipeline:
    return _load(tiny_model_dir)


def test_fast_path_for_device_resolves_auto() -> None:
    assert FastPath.for_device("cpu") == FastPath(compile=False, pad_batches=False)  # eager: no padding
    assert FastPath.for_device("cpu", compile="on") == FastPath(compile=True, pad_batches=True)
    assert FastPath.for_device("cuda", pad_batches=False).pad_batches is False
    assert FastPath.for_device("cuda:0", compile="auto").compile is True
    assert FastPath.for_device("cuda", compile="off").compile is False
    with pytest.raises(ValueError, match="auto, on or off"):
        FastPath.for_device("cpu", compile="yes")


# ------------------------------------------------------------------------------ equivalence
@pytest.mark.parametrize("max_batch", [1, 2, 4, 8])
def test_padded_chunks_equal_the_eager_path(tiny_model_dir: Path, eager: np.ndarray, max_batch: int) -> None:
    pipe = _load(tiny_model_dir)
    enable_fast_path(pipe, FastPath(pad_batches=True))
    calls: list[int] = []
    pipe.transformer.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    out = pipe(_image(), azimuths=AZIMUTHS, num_inference_steps=STEPS, generator=5, max_batch=max_batch).images
    assert out.shape == eager.shape
    np.testing.assert_allclose(out, eager, atol=ATOL)
    # CFG doubles the rows; every chunk ran at a planned (padded) size.
    sizes = {2 * size for _, size in plan_chunks(len(AZIMUTHS), max_batch, pad=True)}
    assert set(calls) == sizes
    if max_batch >= 8:
        assert calls == [16] * STEPS  # five views padded to one chunk of eight


def test_compiled_and_padded_equals_eager_and_compiles_each_shape_once(
    tiny_model_dir: Path, eager: np.ndarray
) -> None:
    pipe = _load(tiny_model_dir)
    counter = CompileCounter()
    enable_fast_path(pipe, FastPath(compile=True, pad_batches=True, backend=counter))
    out = pipe(_image(), azimuths=AZIMUTHS, num_inference_steps=STEPS, generator=5, max_batch=4).images
    np.testing.assert_allclose(out, eager, atol=ATOL)
    compiled = counter.frame_count
    assert compiled >= 2  # the transformer and the VAE decoder went through the compiler
    # Shapes 4 and 1 are compiled now: 4, 3 (padded to 4) and 1 views compile nothing new; 2 views do.
    for n in (4, 3, 1):
        pipe(_image(), azimuths=AZIMUTHS[:n], num_inference_steps=STEPS, generator=5, max_batch=4)
        assert counter.frame_count == compiled, n
    pipe(_image(), azimuths=AZIMUTHS[:2], num_inference_steps=STEPS, generator=5, max_batch=4)
    assert counter.frame_count > compiled
    again = pipe(_image(), azimuths=AZIMUTHS, num_inference_steps=STEPS, generator=5, max_batch=4).images
    np.testing.assert_array_equal(again, out)


def test_prepare_for_serving_warms_every_shape_the_rules_need(tiny_model_dir: Path, eager: np.ndarray) -> None:
    pipe = _load(tiny_model_dir)
    counter = CompileCounter()
    fast = FastPath(compile=True, pad_batches=True, backend=counter)
    max_batch, seconds = prepare_for_serving(pipe, fast, "auto", 3.0, view_counts=[5, 2])
    assert max_batch == CPU_AUTO_BATCH and seconds > 0
    warmed = counter.frame_count
    assert warmed >= 4  # shapes 8 and 2, transformer and decoder each
    out = pipe(_image(), azimuths=AZIMUTHS, num_inference_steps=STEPS, generator=5, max_batch=max_batch).images
    pipe(_image(), azimuths=AZIMUTHS[:2], num_inference_steps=STEPS, generator=5, max_batch=max_batch)
    assert counter.frame_count == warmed  # the first jobs compile nothing
    np.testing.assert_allclose(out, eager, atol=ATOL)


def test_a_compiler_failure_at_warm_up_falls_back_to_eager(tiny_model_dir: Path, eager: np.ndarray) -> None:
    def broken_backend(gm, example_inputs):  # noqa: ANN001, ANN202
        raise RuntimeError("no compiler here")

    pipe = _load(tiny_model_dir)
    fast = FastPath(compile=True, pad_batches=True, backend=broken_backend)
    max_batch, _ = prepare_for_serving(pipe, fast, 8, 3.0, view_counts=[5])
    assert pipe.fast_path.compile is False and pipe.transformer._compiled_call_impl is None
    out = pipe(_image(), azimuths=AZIMUTHS, num_inference_steps=STEPS, generator=5, max_batch=max_batch).images
    np.testing.assert_allclose(out, eager, atol=ATOL)


@pytest.mark.slow
def test_inductor_compiled_pipeline_matches_eager(tiny_model_dir: Path, eager: np.ndarray) -> None:
    """The real compiler (Inductor, C++ on the CPU): about a minute on two cores."""
    pipe = _load(tiny_model_dir)
    enable_fast_path(pipe, FastPath(compile=True, pad_batches=True))
    out = pipe(_image(), azimuths=AZIMUTHS, num_inference_steps=STEPS, generator=5, max_batch=8).images
    np.testing.assert_allclose(out, eager, atol=1e-4)  # fused kernels reassociate float32 sums


def test_conditioning_is_computed_once_per_input_whatever_the_chunks(tiny_model_dir: Path) -> None:
    pipe = _load(tiny_model_dir)
    enable_fast_path(pipe, FastPath(pad_batches=True))
    calls = {"clip": 0, "vae_encode": 0, "decode": 0}
    pipe.image_encoder.register_forward_hook(lambda *a: calls.__setitem__("clip", calls["clip"] + 1))
    pipe.vae.encoder.register_forward_hook(lambda *a: calls.__setitem__("vae_encode", calls["vae_encode"] + 1))
    pipe.vae.decoder.register_forward_hook(lambda *a: calls.__setitem__("decode", calls["decode"] + 1))
    pipe(_image(), azimuths=AZIMUTHS, num_inference_steps=1, generator=5, max_batch=2)
    assert calls == {"clip": 1, "vae_encode": 1, "decode": 3}  # 5 views in chunks of 2, 2 and 1


def test_bfloat16_fast_path_is_finite_and_close_to_float32(tiny_model_dir: Path, eager: np.ndarray) -> None:
    pipe = SvdrrPipeline.from_pretrained(tiny_model_dir, torch_dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae.dtype == torch.bfloat16  # bf16 has float32's range: no NaN, no upcast needed
    enable_fast_path(pipe, FastPath(pad_batches=True))
    out = pipe(_image(), azimuths=AZIMUTHS, num_inference_steps=STEPS, generator=5, max_batch=8).images
    assert np.isfinite(out).all()
    diff = np.abs(out - eager)
    assert diff.mean() < 5e-3 and diff.max() < 5e-2  # measured: mean 1.1e-3, max 7.7e-3
