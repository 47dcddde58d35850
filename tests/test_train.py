"""The weak-to-strong trainer on a tiny synthetic DRR dataset (CPU, seconds per test)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dicomnode.errors import SynthesisError
from synthesis.architecture import build_components, tiny
from synthesis.drr_dataset import INDEX_COLUMNS
from synthesis.pipeline import SvdrrPipeline
from synthesis.train import (
    Stage,
    TrainConfig,
    TrainingModel,
    make_optimizer,
    noise_schedule_like,
    train,
    widen_patch_embedding,
)
from synthesis.training_data import DrrTrainingPairs, exclude_azimuths

AZIMUTHS = (0.0, 30.0, -30.0, 60.0)


def _write_dataset(folder: Path, size: int = 32, cases: int = 2) -> Path:
    """A DRR-like folder: a bright blob that moves with azimuth, 16-bit PNGs, index.csv."""
    (folder / "images").mkdir(parents=True)
    yy, xx = np.mgrid[0:size, 0:size] / size
    lines = [",".join(INDEX_COLUMNS)]
    for case_number in range(cases):
        case = f"case{case_number}"
        for view_id, azimuth in enumerate(AZIMUTHS):
            centre = 0.5 + 0.3 * math.sin(math.radians(azimuth))
            image = np.exp(-((xx - centre) ** 2 + (yy - 0.5 - 0.1 * case_number) ** 2) / 0.02)
            pixels = (image / image.max() * 65535).astype(np.uint16)
            path = f"images/{case}_000_{view_id:04d}.png"
            Image.fromarray(pixels.astype(np.int32), mode="I").convert("I;16").save(folder / path)
            lines.append(f"P{case_number},{case},0,{view_id},{azimuth},0,{path}")
    (folder / "index.csv").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_dataset(tmp_path_factory.mktemp("drr"))


def _config(steps: int, arch=None, **kw) -> TrainConfig:  # type: ignore[no-untyped-def]
    return TrainConfig(
        stages=(Stage(32, steps, 4, 1e-3),),
        seed=3,
        arch=arch or tiny(32, vae=False, clip=False),
        warmup_steps=2,
        progress=False,
        **kw,
    )


def test_pairs_pose_sign_and_range(dataset: Path) -> None:
    pairs = DrrTrainingPairs(dataset, 16)
    assert len(pairs) == 6  # 3 targets x 2 cases, PA never a target
    row = next(i for i, r in enumerate(pairs.rows) if r.azimuth == 30.0)
    pair = pairs[row]
    assert pair.condition.shape == pair.target.shape == (16, 16)
    assert pair.condition.dtype == np.float32 and pair.pose.dtype == np.float32
    assert pair.target.min() == 0.0 and pair.target.max() == pytest.approx(1.0)
    expected = [-0.0, math.sin(math.radians(-30)), math.cos(math.radians(30)), 0.0]
    np.testing.assert_allclose(pair.pose, expected, atol=1e-7)
    held_out = DrrTrainingPairs(dataset, 16, include=exclude_azimuths([30.0]))
    assert len(held_out) == 4 and all(r.azimuth != 30.0 for r in held_out.rows)


def test_loss_falls(dataset: Path, tmp_path: Path) -> None:
    train(_config(40, checkpoint_every=1000), dataset, tmp_path)
    with open(tmp_path / "loss.csv") as fh:
        losses = [float(r["loss"]) for r in csv.DictReader(fh)]
    assert len(losses) == 40
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    pipe = SvdrrPipeline.from_pretrained(folder)
    return {
        **pipe.transformer.state_dict(),
        **{f"p.{k}": v for k, v in pipe.cc_projection.state_dict().items()},
    }


@pytest.mark.parametrize("with_vae", [False, True])
def test_resume_equals_uninterrupted(dataset: Path, tmp_path: Path, with_vae: bool) -> None:
    arch = tiny(32) if with_vae else tiny(32, vae=False, clip=False)
    whole = train(_config(8, arch, checkpoint_every=4), dataset, tmp_path / "a")
    assert (tmp_path / "a" / "checkpoints" / "step-4" / "trainer.pt").is_file()
    stopped = train(_config(8, arch, checkpoint_every=4), dataset, tmp_path / "b", stop_after=4)
    assert stopped.name == "step-4" and not (tmp_path / "b" / "model").exists()
    early = _weights(tmp_path / "b" / "model-step-4")  # a stopped run leaves a usable model too
    resumed = train(_config(8, arch, checkpoint_every=4), dataset, tmp_path / "b")
    a, b = _weights(whole), _weights(resumed)
    assert any(not torch.equal(early[key], b[key]) for key in b)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert (tmp_path / "a" / "loss.csv").read_text() == (tmp_path / "b" / "loss.csv").read_text()


def test_two_stages_save_a_loadable_model_that_samples(dataset: Path, tmp_path: Path) -> None:
    config = TrainConfig(
        stages=(Stage(16, 2, 2, 1e-3), Stage(32, 2, 2, 5e-4)),
        seed=0,
        arch=tiny(16),
        progress=False,
    )
    folder = train(config, dataset, tmp_path)
    pipe = SvdrrPipeline.from_pretrained(folder)
    assert pipe.resolution == 32 and pipe.vae is not None and pipe.image_encoder is not None
    image = np.asarray(Image.open(dataset / "images/case0_000_0000.png"), dtype=np.float32) / 65535
    out = pipe(image, azimuths=[30.0], num_inference_steps=2, generator=1)
    assert out.images.shape == (1, 32, 32) and np.isfinite(out.images).all()


def _training_model(arch) -> TrainingModel:  # type: ignore[no-untyped-def]
    c = build_components(arch)
    c["transformer"].train().requires_grad_(True)
    c["cc_projection"].reset_to_identity()
    return TrainingModel(
        c["transformer"],
        c["cc_projection"],
        c["vae"],
        c["image_encoder"],
        noise_schedule_like(c["scheduler"]),
    )


def test_drop_both_zeroes_token_and_condition_latent(dataset: Path) -> None:
    model = _training_model(tiny(32))
    seen = {}

    def hook(module, args, kwargs):  # type: ignore[no-untyped-def]
        seen["latent"] = args[0][:, 4:].clone()
        seen["token"] = kwargs["encoder_hidden_states"].clone()

    model.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    condition, target, pose = DrrTrainingPairs(dataset, 32).batch([0, 1, 2])
    model.loss(condition, target, pose, torch.Generator().manual_seed(0), drop=(0.0, 1.0, 0.0))
    assert seen["latent"].shape == (3, 4, 16, 16) and not seen["latent"].any()
    assert seen["token"].shape == (3, 1, 32) and not seen["token"].any()
    model.loss(condition, target, pose, torch.Generator().manual_seed(0), drop=(0.0, 0.0, 0.0))
    assert seen["latent"].abs().sum() > 0 and seen["token"].abs().sum() > 0
    model.loss(condition, target, pose, torch.Generator().manual_seed(0), drop=(0.0, 0.0, 1.0))
    assert not seen["latent"].any() and seen["token"].abs().sum() > 0


def test_projection_group_at_ten_times_lr() -> None:
    model = _training_model(tiny(32, vae=False, clip=False))
    stage = Stage(32, 10, 2, 3e-6)
    optimizer = make_optimizer(model, stage, _config(10))
    transformer_group, projection_group = optimizer.param_groups
    assert transformer_group["lr"] == 3e-6 and projection_group["lr"] == pytest.approx(3e-5)
    assert {id(p) for p in projection_group["params"]} == {id(p) for p in model.cc_projection.parameters()}
    assert projection_group["weight_decay"] == 0.01


def test_widen_patch_embedding_keeps_the_function() -> None:
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    original = PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=1,
        cross_attention_dim=16,
        sample_size=8,
        caption_channels=12,
        norm_type="ada_norm_single",
        use_additional_conditions=False,
    ).eval()
    widened = widen_patch_embedding(original).eval()
    assert widened.config.in_channels == 8 and widened.config.caption_channels is None
    assert not any(k.startswith("caption_projection") for k in widened.state_dict())
    x = torch.randn(2, 4, 8, 8)
    tokens = torch.randn(2, 1, 16)
    t = torch.tensor([10, 500])
    kw = {
        "timestep": t,
        "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
        "return_dict": False,
    }
    with torch.no_grad():
        # the original projects 12-d captions; feed both the same 16-d token without projection
        original.caption_projection = None
        want = original(x, encoder_hidden_states=tokens, **kw)[0]
        got = widened(torch.cat([x, torch.randn_like(x)], dim=1), encoder_hidden_states=tokens, **kw)[0]
    torch.testing.assert_close(got, want)


def test_cli_trains_and_resumes(dataset: Path, tmp_path: Path) -> None:
    import argparse

    from dicomnode.cli.train import register, run

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    argv = [
        "train",
        "--data",
        str(dataset),
        "--out",
        str(tmp_path),
        "--arch",
        "tiny-pixel",
        "--stages",
        "32:3:2:1e-3",
        "--checkpoint-every",
        "2",
        "--device",
        "cpu",
        "--no-progress",
        "--hold-out-azimuths",
        "60",
    ]
    args = parser.parse_args(argv)
    assert run(args) == 0
    assert (tmp_path / "model" / "model_index.json").is_file()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-2", "step-3"]
    assert run(args) == 0  # again: resumes at the last step, trains nothing more
    with open(tmp_path / "loss.csv") as fh:
        assert [r["step"] for r in csv.DictReader(fh)] == ["1", "2", "3"]
    other = parser.parse_args([*argv[:6], "tiny-pixel", "--stages", "32:4:2:1e-3", "--no-progress"])
    with pytest.raises(SynthesisError, match="other settings"):
        run(other)
    missing = parser.parse_args(["train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path)])
    assert run(missing) == 3


def test_v_prediction_is_recorded_for_the_engine_and_trained_on_velocity(dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(SynthesisError, match="prediction_type"):
        _config(2, prediction_type="x0")
    folder = train(_config(2, prediction_type="v_prediction"), dataset, tmp_path)
    pipe = SvdrrPipeline.from_pretrained(folder)
    assert pipe.scheduler.config.prediction_type == "v_prediction"  # the sampler reads the output as v
    image = np.asarray(Image.open(dataset / "images/case0_000_0000.png"), dtype=np.float32) / 65535
    assert np.isfinite(pipe(image, azimuths=[30.0], num_inference_steps=2, generator=1).images).all()

    # The loss target is the velocity alpha*eps - sigma*x0: a model that outputs zeros scores its mean square.
    model = _training_model(tiny(32, vae=False, clip=False))
    model.noise_scheduler = type(model.noise_scheduler).from_config(
        model.noise_scheduler.config, prediction_type="v_prediction"
    )
    model.transformer.forward = lambda x, **kw: (torch.zeros_like(x),)  # type: ignore[method-assign]
    cond = torch.rand(2, 1, 32, 32)
    target = torch.rand(2, 1, 32, 32)
    pose = torch.zeros(2, 4)
    loss = model.loss(cond, target, pose, torch.Generator().manual_seed(0), drop=(0.0, 0.0, 0.0))
    g = torch.Generator().manual_seed(0)  # replay the loss's draws: noise, then timesteps
    noise = torch.randn(target.shape, generator=g)
    t = torch.randint(0, 1000, (2,), generator=g)
    velocity = model.noise_scheduler.get_velocity(target * 2 - 1, noise, t)
    assert float(loss) == pytest.approx(float((velocity**2).mean()), rel=1e-5)
    assert float(loss) != pytest.approx(float((noise**2).mean()), rel=1e-2)


def test_start_from_a_pixart_sigma_folder(dataset: Path, tmp_path: Path) -> None:
    """The recipe's start: PixArt-Sigma (4 input channels, T5 caption projection) plus its VAE."""
    from diffusers import AutoencoderKL, PixArtTransformer2DModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    arch = tiny(32)
    pixart_config = {**arch.transformer_config(), "in_channels": 4, "caption_channels": 24}
    PixArtTransformer2DModel(**pixart_config).save_pretrained(tmp_path / "pixart" / "transformer")
    AutoencoderKL(**arch.vae).save_pretrained(tmp_path / "pixart" / "vae")
    CLIPVisionModelWithProjection(CLIPVisionConfig(**arch.clip)).save_pretrained(tmp_path / "clip")
    config = TrainConfig(
        stages=(Stage(32, 2, 2, 1e-3),),
        init_pixart=tmp_path / "pixart",
        init_image_encoder=tmp_path / "clip",
        warmup_steps=1,
        progress=False,
    )
    pipe = SvdrrPipeline.from_pretrained(train(config, dataset, tmp_path / "run"))
    assert pipe.transformer.config.in_channels == 8 and pipe.transformer.caption_projection is None
    assert pipe.cc_projection.config.in_channel == arch.clip["projection_dim"] + 4
    image = np.asarray(Image.open(dataset / "images/case0_000_0000.png"), dtype=np.float32) / 65535
    assert np.isfinite(pipe(image, azimuths=[30.0], num_inference_steps=2, generator=1).images).all()
    with pytest.raises(SynthesisError, match="exactly one"):
        TrainConfig(stages=(Stage(32, 2, 2, 1e-3),), arch=arch, init_pixart=tmp_path / "pixart")
    with pytest.raises(SynthesisError, match="PixArt-Sigma"):
        train(
            TrainConfig(stages=(Stage(32, 2, 2, 1e-3),), init_pixart=tmp_path / "nothing", progress=False),
            dataset,
            tmp_path / "run2",
        )


def test_cli_holds_out_cases_and_stops_early_with_a_model(dataset: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    import argparse

    from dicomnode.cli.train import register, run

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    base = ["train", "--data", str(dataset), "--arch", "tiny-pixel", "--stages", "32:4:2:1e-3", "--no-progress"]
    args = parser.parse_args([*base, "--out", str(tmp_path / "a"), "--hold-out-cases", "case1", "--stop-after", "2"])
    assert run(args) == 0
    assert f"model: {tmp_path / 'a' / 'model-step-2'}" in capsys.readouterr().out
    assert SvdrrPipeline.from_pretrained(tmp_path / "a" / "model-step-2").resolution == 32
    assert sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir()) == ["step-2"]
    everything = parser.parse_args([*base, "--out", str(tmp_path / "b"), "--hold-out-cases", "case0,case1"])
    with pytest.raises(SynthesisError, match="no training pairs"):
        run(everything)
    assert run(parser.parse_args([*base, "--out", str(tmp_path / "c"), "--stop-after", "0"])) == 2
    shaped = [*base[:4], "demo", *base[5:], "--shape", "2,2,8,4", "--stop-after", "1", "--out", str(tmp_path / "d")]
    assert run(parser.parse_args(shaped)) == 0
    config = SvdrrPipeline.from_pretrained(tmp_path / "d" / "model-step-1").transformer.config
    assert (config.num_layers, config.num_attention_heads, config.attention_head_dim, config.patch_size) == (2, 2, 8, 4)
    assert run(parser.parse_args([*shaped[:-1], str(tmp_path / "e"), "--shape", "2,2"])) == 2
    assert run(parser.parse_args([*base, "--shape", "2,2,8,4", "--out", str(tmp_path / "f")])) == 2  # tiny-pixel
