"""The SV-DRR engine on tiny real components: loading, and each convention the spec warns about."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DPMSolverMultistepScheduler

from dicomnode.errors import ModelLoadError, SynthesisError
from synthesis import SvdrrPipeline
from synthesis.architecture import build_components, tiny
from synthesis.pipeline import CLIP_MEAN, CLIP_STD
from synthesis.views import View, make_views, view_seed
from tests.tiny_model import make_tiny_model

STEPS = 3


def _image(size: int = 32, seed: int = 0) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size] / size
    rng = np.random.default_rng(seed)
    return np.clip(
        0.5 + 0.3 * np.sin(6 * x) * np.cos(4 * y) + 0.05 * rng.standard_normal((size, size)), 0, 1
    ).astype(np.float32)


@pytest.fixture(scope="module")
def pipe(tiny_model_dir: Path) -> SvdrrPipeline:
    p = SvdrrPipeline.from_pretrained(tiny_model_dir)
    p.set_progress_bar_config(disable=True)
    return p


class Capture:
    """Forward hook recording what a module was called with."""

    def __init__(self, module: torch.nn.Module):
        self.calls: list[tuple[tuple, dict]] = []
        self.handle = module.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output):  # noqa: ANN001
        self.calls.append((tuple(a.clone() if torch.is_tensor(a) else a for a in args), dict(kwargs)))

    def __enter__(self) -> Capture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


# ------------------------------------------------------------------------------------ loading
def test_loads_published_layout_with_custom_class_names(tiny_model_dir: Path, pipe: SvdrrPipeline) -> None:
    index = json.loads((tiny_model_dir / "model_index.json").read_text())
    assert index["transformer"][1] == "SvdrrTransformer2DModel"
    assert json.loads((tiny_model_dir / "transformer/config.json").read_text())["_class_name"] == (
        "SvdrrTransformer2DModel"
    )
    assert type(pipe.transformer).__name__ == "PixArtTransformer2DModel"
    assert type(pipe.image_encoder).__name__ == "CLIPVisionModelWithProjection"
    assert pipe.transformer.config.use_additional_conditions is False
    assert pipe.resolution == 32
    assert len(pipe.model_identity) == 64
    assert not any(p.requires_grad for p in pipe.transformer.parameters())


def test_save_then_load_keeps_identity_and_output(pipe: SvdrrPipeline, tmp_path: Path) -> None:
    pipe.save_pretrained(tmp_path / "copy")
    for piece in ("model_index.json", "vae", "image_encoder", "transformer", "cc_projection", "scheduler"):
        assert (tmp_path / "copy" / piece).exists(), piece
    again = SvdrrPipeline.from_pretrained(tmp_path / "copy")
    again.set_progress_bar_config(disable=True)
    assert again.model_identity == pipe.model_identity
    a = pipe(_image(), azimuths=[45], num_inference_steps=STEPS, generator=3).images
    b = again(_image(), azimuths=[45], num_inference_steps=STEPS, generator=3).images
    np.testing.assert_array_equal(a, b)


def test_identity_changes_with_weights(tmp_path: Path, tiny_model_dir: Path, pipe: SvdrrPipeline) -> None:
    other = make_tiny_model(tmp_path / "other", seed=1)
    assert SvdrrPipeline.from_pretrained(other).model_identity != pipe.model_identity


def test_identity_does_not_depend_on_load_dtype(tiny_model_dir: Path, pipe: SvdrrPipeline) -> None:
    half = SvdrrPipeline.from_pretrained(tiny_model_dir, torch_dtype=torch.bfloat16)
    assert half.transformer.dtype == torch.bfloat16
    assert half.model_identity == pipe.model_identity


def test_unset_additional_conditions_is_forced_off(tmp_path: Path) -> None:
    """Left unset, diffusers turns use_additional_conditions on at sample_size 128 (spec pitfall)."""
    folder = make_tiny_model(tmp_path / "m128", resolution=256)  # tiny VAE: x2 -> sample_size 128
    config_path = folder / "transformer/config.json"
    config = json.loads(config_path.read_text())
    assert config["sample_size"] == 128
    del config["use_additional_conditions"]
    config_path.write_text(json.dumps(config))
    assert SvdrrPipeline.from_pretrained(folder).transformer.config.use_additional_conditions is False


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda d: shutil.rmtree(d / "transformer"), "'transformer' is missing"),
        (lambda d: shutil.rmtree(d / "scheduler"), "'scheduler' is missing"),
        (lambda d: (d / "model_index.json").unlink(), "model_index.json is missing"),
        (lambda d: (d / "model_index.json").write_text("{not json"), "not valid JSON"),
        (lambda d: shutil.rmtree(d / "vae"), "'vae' is missing"),
        (lambda d: _truncate(next((d / "transformer").glob("*.safetensors"))), "transformer"),
        (lambda d: _truncate(next((d / "cc_projection").glob("*.safetensors"))), "cc_projection"),
    ],
)
def test_missing_or_corrupt_pieces_name_folder_and_piece(
    tiny_model_dir: Path, tmp_path: Path, damage, expected
) -> None:  # noqa: ANN001
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    damage(folder)
    with pytest.raises(ModelLoadError) as info:
        SvdrrPipeline.from_pretrained(folder)
    assert str(folder) in str(info.value)
    assert expected in str(info.value)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        SvdrrPipeline.from_pretrained(tmp_path / "nowhere")


# ------------------------------------------------------------------------------- conventions
def test_pose_is_condition_minus_target() -> None:
    p = View(azimuth=30, elevation=10).pose()
    assert p == pytest.approx(
        (-math.radians(10), math.sin(-math.radians(30)), math.cos(math.radians(30)), 0.0)
    )
    left, right = View(90).pose(), View(-90).pose()
    assert left[1] == pytest.approx(-1.0) and right[1] == pytest.approx(1.0)
    assert View(0).pose() == pytest.approx((0.0, 0.0, 1.0, 0.0))


def test_pose_reaches_the_projection(pipe: SvdrrPipeline) -> None:
    with Capture(pipe.cc_projection) as cap:
        pipe(_image(), azimuths=[60, -20], elevations=[15, 0], num_inference_steps=1, generator=0)
    (inp,), _ = cap.calls[0]
    embed_dim = pipe.image_encoder.config.projection_dim
    assert inp.shape == (2, 1, embed_dim + 4)
    for row, view in zip(inp[:, 0, embed_dim:], make_views([60, -20], [15, 0]), strict=True):
        assert row.tolist() == pytest.approx(list(view.pose()), abs=1e-6)


def test_clip_input_is_resized_without_crop(pipe: SvdrrPipeline) -> None:
    image = _image()
    with Capture(pipe.image_encoder) as cap:
        pipe(image, azimuths=[30], num_inference_steps=1, generator=0)
    pixel_values = cap.calls[0][1]["pixel_values"]
    size = pipe.image_encoder.config.image_size
    x = torch.from_numpy(image)[None, None].expand(1, 3, -1, -1) * 2 - 1
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=True, antialias=False)
    expected = ((x + 1) / 2 - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(
        1, 3, 1, 1
    )
    torch.testing.assert_close(pixel_values, expected)


def test_conditioning_latent_is_vae_mode_unscaled_and_null_branch_is_zero(pipe: SvdrrPipeline) -> None:
    image = _image()
    with Capture(pipe.transformer) as cap:
        pipe(image, azimuths=[30, 60], num_inference_steps=1, guidance_scale=2.0, generator=0)
    (model_in,), kwargs = cap.calls[0]
    c = pipe.latent_channels
    x = torch.from_numpy(image)[None, None].expand(1, 3, -1, -1) * 2 - 1
    mode = pipe.vae.encode(x).latent_dist.mode()
    assert pipe.vae.config.scaling_factor != 1.0
    assert model_in.shape[0] == 4  # [uncond x2 | cond x2]
    torch.testing.assert_close(model_in[2:, c:], mode.expand(2, -1, -1, -1))
    assert torch.count_nonzero(model_in[:2, c:]) == 0
    context = kwargs["encoder_hidden_states"]
    assert torch.count_nonzero(context[:2]) == 0 and torch.count_nonzero(context[2:]) > 0


def test_guidance_one_runs_the_conditional_branch_alone(pipe: SvdrrPipeline) -> None:
    with Capture(pipe.transformer) as cap:
        out = pipe(_image(), azimuths=[30, 60], num_inference_steps=STEPS, guidance_scale=1.0, generator=5)
    assert all(args[0].shape[0] == 2 for args, _ in cap.calls)
    reference = _reference_sample(pipe, _image(), View(60), view_seed(5, View(60)), guidance=1.0)
    np.testing.assert_allclose(out.images[1], reference, atol=1e-5)


def test_cfg_matches_an_independent_reference_sampler(pipe: SvdrrPipeline) -> None:
    out = pipe(
        _image(), azimuths=[-45], elevations=[10], num_inference_steps=STEPS, guidance_scale=3.0, generator=7
    )
    view = View(-45, 10)
    reference = _reference_sample(pipe, _image(), view, view_seed(7, view), guidance=3.0)
    np.testing.assert_allclose(out.images[0], reference, atol=1e-5)
    unguided = _reference_sample(pipe, _image(), view, view_seed(7, view), guidance=1.0)
    assert np.abs(out.images[0] - unguided).max() > 1e-3  # guidance really changes the result


def _reference_sample(
    pipe: SvdrrPipeline, image: np.ndarray, view: View, seed: int, guidance: float
) -> np.ndarray:
    """One view, written out plainly from the spec, two transformer calls per step."""
    with torch.inference_mode():
        x = torch.from_numpy(image)[None, None] * 2 - 1
        rgb = x.expand(1, 3, -1, -1)
        size = pipe.image_encoder.config.image_size
        clip_in = F.interpolate(rgb, size=(size, size), mode="bicubic", align_corners=True, antialias=False)
        clip_in = ((clip_in + 1) / 2 - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(
            CLIP_STD
        ).view(1, 3, 1, 1)
        embeds = pipe.image_encoder(pixel_values=clip_in).image_embeds
        token = pipe.cc_projection(torch.cat([embeds, torch.tensor([view.pose()])], dim=-1))[:, None]
        cond = pipe.vae.encode(rgb).latent_dist.mode()
        scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
        scheduler.set_timesteps(STEPS)
        g = torch.Generator().manual_seed(seed)
        latents = torch.randn((1, 4, 16, 16), generator=g) * scheduler.init_noise_sigma
        kw = {"added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
        for t in scheduler.timesteps:
            ts = t.expand(1)
            e_c = pipe.transformer(
                torch.cat([latents, cond], 1), encoder_hidden_states=token, timestep=ts, **kw
            ).sample
            e_u = pipe.transformer(
                torch.cat([latents, torch.zeros_like(cond)], 1),
                encoder_hidden_states=torch.zeros_like(token),
                timestep=ts,
                **kw,
            ).sample
            eps = e_u[:, :4] + guidance * (e_c[:, :4] - e_u[:, :4])
            latents = scheduler.step(eps, t, latents).prev_sample
        decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
        return ((decoded / 2 + 0.5).clamp(0, 1).mean(1))[0].numpy()


def test_a_view_is_the_same_alone_or_in_a_batch(pipe: SvdrrPipeline) -> None:
    alone = pipe(_image(), azimuths=[30], num_inference_steps=STEPS, generator=11).images[0]
    batched = pipe(
        _image(), azimuths=[-60, 30, 90], num_inference_steps=STEPS, generator=11, max_batch=8
    ).images
    chunked = pipe(
        _image(), azimuths=[-60, 30, 90], num_inference_steps=STEPS, generator=11, max_batch=1
    ).images
    np.testing.assert_allclose(batched[1], alone, atol=1e-5)
    np.testing.assert_allclose(chunked, batched, atol=1e-5)


def test_explicit_generators_per_view(pipe: SvdrrPipeline) -> None:
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    both = pipe(_image(), azimuths=[10, 20], num_inference_steps=STEPS, generator=gens).images
    second = pipe(
        _image(), azimuths=[20], num_inference_steps=STEPS, generator=[torch.Generator().manual_seed(2)]
    )
    np.testing.assert_allclose(both[1], second.images[0], atol=1e-5)


def test_deterministic_for_a_seed_and_different_across_seeds(pipe: SvdrrPipeline) -> None:
    a = pipe(_image(), azimuths=[45], num_inference_steps=STEPS, generator=1).images
    b = pipe(_image(), azimuths=[45], num_inference_steps=STEPS, generator=1).images
    c = pipe(_image(), azimuths=[45], num_inference_steps=STEPS, generator=2).images
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3


def test_output_contract(pipe: SvdrrPipeline) -> None:
    out = pipe(_image(), azimuths=[-90, 0, 90], num_inference_steps=STEPS, generator=0)
    assert out.images.shape == (3, 32, 32) and out.images.dtype == np.float32
    assert out.images.min() >= 0 and out.images.max() <= 1
    assert [v.azimuth for v in out.views] == [-90, 0, 90]
    assert len(set(out.seeds)) == 3
    assert {"condition_s", "denoise_s", "decode_s", "total_s"} <= set(out.timings)
    pt = pipe(_image(), azimuths=[10], num_inference_steps=1, generator=0, output_type="pt").images
    assert isinstance(pt, torch.Tensor) and pt.shape == (1, 32, 32)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"image": np.zeros((32, 32, 3), np.float32)}, "2-D"),
        ({"image": np.full((32, 32), 2.0, np.float32)}, "[0, 1]"),
        ({"image": np.zeros((34, 34), np.float32)}, "multiples of 4"),  # tiny: VAE x2, patch 2
        ({"azimuths": []}, "at least one"),
        ({"azimuths": [120]}, "within +-90"),
        ({"azimuths": [10, 20], "elevations": [5]}, "one per azimuth"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"guidance_scale": 0.5}, "guidance_scale"),
        ({"generator": [torch.Generator()]}, "one per view"),
    ],
)
def test_bad_requests_raise_synthesis_error(pipe: SvdrrPipeline, kwargs: dict, message: str) -> None:
    call = {"image": _image(), "azimuths": [10, 20], "num_inference_steps": 1, "generator": 0, **kwargs}
    with pytest.raises(SynthesisError) as info:
        pipe(**call)
    assert message in str(info.value)


@pytest.mark.parametrize(
    "arch", [{"vae": False}, {"clip": False}, {"vae": False, "clip": False, "learned_sigma": False}]
)
def test_optional_components(arch: dict, tmp_path: Path) -> None:
    folder = make_tiny_model(tmp_path / "m", **arch)
    p = SvdrrPipeline.from_pretrained(folder)
    p.set_progress_bar_config(disable=True)
    assert (p.vae is None) == (arch.get("vae") is False)
    assert (p.image_encoder is None) == (arch.get("clip") is False)
    out = p(_image(), azimuths=[-30, 30], num_inference_steps=STEPS, generator=0)
    assert out.images.shape == (2, 32, 32) and np.isfinite(out.images).all()
    assert np.abs(out.images[0] - out.images[1]).max() > 0  # the pose reaches the model


def test_pixel_space_conditioning_is_the_image(tmp_path: Path) -> None:
    p = SvdrrPipeline(**build_components(tiny(32, vae=False, clip=False)))
    p.set_progress_bar_config(disable=True)
    image = _image()
    with Capture(p.transformer) as cap:
        p(image, azimuths=[30], num_inference_steps=1, guidance_scale=1.0, generator=0)
    (model_in,), _ = cap.calls[0]
    np.testing.assert_allclose(model_in[0, 1].numpy(), image * 2 - 1, atol=1e-6)


def test_inconsistent_components_are_refused() -> None:
    components = build_components(tiny(32))
    components["image_encoder"] = None  # the projection still expects 16 + 4 inputs
    with pytest.raises(SynthesisError, match="cc_projection in_channel"):
        SvdrrPipeline(**components)
