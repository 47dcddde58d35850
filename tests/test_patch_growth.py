"""Growing a trained pixel-space model's patch (synthesis/patch_growth.py) and ``train --grow-patch``."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dicomnode.errors import SynthesisError
from synthesis.architecture import build_components, demo
from synthesis.patch_growth import grow_patch
from synthesis.pipeline import SvdrrPipeline
from synthesis.train import Stage, TrainConfig
from tests.test_train import _write_dataset


def _trained_like_transformer(patch: int = 4, resolution: int = 32):  # type: ignore[no-untyped-def]
    """A small transformer with every weight moved off its initialisation (PixArt zero-inits proj_out)."""
    transformer = build_components(demo(resolution, layers=2, heads=2, head_dim=16, patch_size=patch))["transformer"]
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in transformer.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return transformer


@pytest.mark.parametrize("factor", [2, 3])
def test_grown_model_computes_the_small_models_function_on_block_means(factor: int) -> None:
    small = _trained_like_transformer()
    grown = grow_patch(small, factor)
    assert grown.config.patch_size == 4 * factor and grown.config.sample_size == 32 * factor
    assert grown.config.interpolation_scale == small.config.interpolation_scale  # the same positional grid
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2, 32 * factor, 32 * factor, generator=generator)
    tokens = torch.randn(3, 1, small.config.cross_attention_dim, generator=generator)
    steps = torch.tensor([5, 400, 990])
    with torch.no_grad():
        big = grown(x, encoder_hidden_states=tokens, timestep=steps).sample
        ref = small(F.avg_pool2d(x, factor), encoder_hidden_states=tokens, timestep=steps).sample
    ref = ref.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)
    assert big.shape == (3, 2, 32 * factor, 32 * factor)  # [mean | variance] of one pixel channel
    assert torch.allclose(big, ref, atol=1e-5) and ref.abs().mean() > 0.1
    # Each output block is one value: the growth adds no detail until trained.
    assert torch.equal(big[..., 0::factor, 0::factor], big[..., factor - 1 :: factor, factor - 1 :: factor])


def test_jitter_breaks_the_block_symmetry_but_keeps_block_means_for_block_constant_images() -> None:
    small = _trained_like_transformer()
    grown = grow_patch(small, 2, jitter=0.25, seed=3)
    again = grow_patch(small, 2, jitter=0.25, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(grown.state_dict().values(), again.state_dict().values(), strict=True))
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(2, 2, 32, 32, generator=generator)
    tokens = torch.randn(2, 1, small.config.cross_attention_dim, generator=generator)
    steps = torch.tensor([100, 700])
    with torch.no_grad():
        blocky = grown(x.repeat_interleave(2, 2).repeat_interleave(2, 3), encoder_hidden_states=tokens, timestep=steps)
        ref = small(x, encoder_hidden_states=tokens, timestep=steps).sample
    assert torch.allclose(F.avg_pool2d(blocky.sample, 2), ref, atol=1e-5)
    inside = blocky.sample - F.avg_pool2d(blocky.sample, 2).repeat_interleave(2, 2).repeat_interleave(2, 3)
    assert inside.abs().mean() > 1e-3  # the pixels of a block can now differ: no saddle to sit on
    with pytest.raises(SynthesisError, match="jitter"):
        grow_patch(small, 2, jitter=-1.0)


def test_factor_one_is_the_same_model_and_bad_factors_are_refused(tmp_path: Path) -> None:
    small = _trained_like_transformer()
    assert grow_patch(small, 1) is small
    with pytest.raises(SynthesisError, match="factor"):
        grow_patch(small, 0)
    with pytest.raises(SynthesisError, match="init_from"):
        TrainConfig(stages=(Stage(32, 1, 1, 1e-3),), arch=demo(32), grow_patch=2)


def test_cli_continues_a_trained_model_at_twice_the_size(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from dicomnode.cli.train import register, run

    data = _write_dataset(tmp_path / "drr", size=32)
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    common = ["--data", str(data), "--no-progress", "--warmup-steps", "1"]
    first = ["train", *common, "--arch", "demo", "--shape", "2,2,8,4", "--stages", "16:2:2:1e-3"]
    first += ["--out", str(tmp_path / "a")]
    assert run(parser.parse_args(first)) == 0
    small = tmp_path / "a" / "model"

    def grown(factor: str, out: str, *extra: str) -> argparse.Namespace:
        start = ["--from", str(small), "--grow-patch", factor, "--stages", "32:2:2:1e-4"]
        return parser.parse_args(["train", *common, *start, "--out", out, *extra])

    assert run(grown("2", str(tmp_path / "b"))) == 0
    pipe = SvdrrPipeline.from_pretrained(tmp_path / "b" / "model")
    assert pipe.resolution == 32 and pipe.transformer.config.patch_size == 8
    out = pipe(torch.rand(32, 32).numpy(), azimuths=[30.0], num_inference_steps=2, generator=0)
    assert out.images.shape == (1, 32, 32)
    # A run resumed with another growth factor is another run: refused, not silently mixed.
    assert run(grown("2", str(tmp_path / "c"), "--stop-after", "1")) == 0
    with pytest.raises(SynthesisError, match="other settings"):
        run(grown("1", str(tmp_path / "c")))
