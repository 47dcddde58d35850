"""Weak-to-strong training of the SV-DRR transformer and projection (svdrr-spec.md, "Training recipe").

Stages run in sequence at rising resolution, each starting from the previous one's weights (the
transformer is rebuilt with the stage's ``sample_size`` and ``interpolation_scale``, so its sin-cos
positional table follows the new size) and carrying ``cc_projection``. Per step: conditioning latent =
VAE ``mode()`` of the PA image, unscaled; target latent = ``sample()`` x scaling factor; DDPM noise at
uniform timesteps with the pipeline's betas; per-sample conditioning dropout for classifier-free
guidance with the same null branch as the pipeline (zero token after projection, zero latent);
epsilon MSE on the first C output channels. VAE and CLIP stay frozen.

Checkpoints under ``out/checkpoints/step-N/`` hold everything an exact resume needs (weights,
optimizer, lr schedule, RNG states, data position); each is written to a temporary folder and renamed.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import random
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, PixArtTransformer2DModel

from dicomnode.errors import ModelLoadError, SynthesisError
from synthesis.aligned import aligned_condition, is_aligned
from synthesis.architecture import Architecture, build_components
from synthesis.patch_growth import grow_patch
from synthesis.pipeline import SvdrrPipeline
from synthesis.projection import CCProjection
from synthesis.training_data import DrrTrainingPairs, RowFilter

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
LOSS_LOG = "loss.csv"
MODEL_DIR = "model"
TRAINER_STATE = "trainer.pt"
# A grown patch starts with this much symmetry-breaking noise (patch_growth.py: else it stays blocky).
GROW_JITTER = 0.25


@dataclass(frozen=True)
class Stage:
    """One resolution stage: image side in pixels, optimizer steps, batch size, learning rate."""

    resolution: int
    steps: int
    batch_size: int
    lr: float

    def __post_init__(self) -> None:
        if self.resolution < 1 or self.steps < 1 or self.batch_size < 1:
            raise SynthesisError(f"stage resolution, steps and batch_size must be >= 1: {self!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise SynthesisError(f"stage lr must be a positive number, got {self.lr!r}")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a run. Exactly one of ``arch`` (from scratch) or ``init_from``."""

    stages: tuple[Stage, ...]
    seed: int = 0
    arch: Architecture | None = None
    init_from: Path | None = None
    # A PixArt-Sigma diffusers folder (transformer/ with 4 input channels, vae/): the recipe's start.
    init_pixart: Path | None = None
    init_image_encoder: Path | None = None  # with init_pixart: a CLIP vision folder; None = pose-only token
    # With init_from: patch and sample size multiplied by this, the model's function kept (patch_growth.py).
    grow_patch: int = 1
    warmup_steps: int = 1000
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    projection_lr_mult: float = 10.0
    p_drop_clip: float = 0.05
    p_drop_both: float = 0.05
    p_drop_latent: float = 0.05
    checkpoint_every: int = 1000
    gradient_checkpointing: bool = False
    device: str = "cpu"
    include: RowFilter | None = field(default=None, compare=False)
    progress: bool = True
    # What the model predicts: None keeps the starting model's (epsilon, as published). Pixel-space
    # models do better with "v_prediction": their x0 estimate stays bounded at high noise, where an
    # epsilon model's (x - sigma eps) / alpha amplifies small errors by up to 1/alpha ~ 150.
    prediction_type: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", tuple(self.stages))
        if not self.stages:
            raise SynthesisError("a training run needs at least one stage")
        starts = (self.arch, self.init_from, self.init_pixart)
        if sum(x is not None for x in starts) != 1:
            raise SynthesisError(f"give exactly one of arch, init_from or init_pixart, got {starts!r}")
        if self.init_image_encoder is not None and self.init_pixart is None:
            raise SynthesisError("init_image_encoder goes with init_pixart")
        if self.grow_patch < 1 or (self.grow_patch > 1 and self.init_from is None):
            raise SynthesisError(f"grow_patch is a factor >= 1 and goes with init_from, got {self.grow_patch}")
        probs = (self.p_drop_clip, self.p_drop_both, self.p_drop_latent)
        if min(probs) < 0 or sum(probs) > 1 + 1e-9:
            raise SynthesisError(f"dropout probabilities must be >= 0 and sum to <= 1, got {probs}")
        if self.prediction_type not in (None, "epsilon", "v_prediction"):
            raise SynthesisError(f"prediction_type must be epsilon or v_prediction, got {self.prediction_type!r}")
        if self.warmup_steps < 0 or self.checkpoint_every < 1 or self.grad_clip <= 0:
            raise SynthesisError(
                f"warmup_steps >= 0, checkpoint_every >= 1, grad_clip > 0 required, got "
                f"{self.warmup_steps}, {self.checkpoint_every}, {self.grad_clip}"
            )

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)

    def fingerprint(self) -> dict[str, Any]:
        """What a resumed run must share with the checkpoint it resumes."""
        return {
            "stages": [vars(s) for s in self.stages],
            "seed": self.seed,
            "arch": repr(self.arch),
            "prediction_type": self.prediction_type,
            "init": [str(p) for p in (self.init_from, self.init_pixart, self.init_image_encoder) if p is not None],
            **({"grow_patch": self.grow_patch, "grow_jitter": GROW_JITTER} if self.grow_patch != 1 else {}),
        }


# --- model pieces ----------------------------------------------------------------------------------


def stage_transformer(transformer: PixArtTransformer2DModel, sample_size: int) -> PixArtTransformer2DModel:
    """The same weights in a transformer configured for ``sample_size`` (positional table rebuilt)."""
    if int(transformer.config.sample_size) == sample_size:
        return transformer
    config = dict(transformer.config)
    config.update(sample_size=sample_size, interpolation_scale=max(sample_size / 64, 0.125))
    resized = PixArtTransformer2DModel.from_config(config)
    resized.load_state_dict(transformer.state_dict())
    return resized.to(transformer.device)


def widen_patch_embedding(transformer: PixArtTransformer2DModel) -> PixArtTransformer2DModel:
    """A PixArt transformer with twice the input channels, [noisy | condition]; new ones zero.

    Starting from PixArt-Sigma (4 input channels) the recipe widens the patch-embedding conv to 8
    and drops the T5 caption projection; with the new channels zero the widened model computes the
    same function as the original until training moves them.
    """
    c = int(transformer.config.in_channels)
    config = dict(transformer.config)
    config.update(in_channels=2 * c, caption_channels=None, use_additional_conditions=False)
    widened = PixArtTransformer2DModel.from_config(config)
    state = {k: v for k, v in transformer.state_dict().items() if not k.startswith("caption_projection.")}
    weight = state["pos_embed.proj.weight"]
    state["pos_embed.proj.weight"] = torch.cat([weight, torch.zeros_like(weight)], dim=1)
    widened.load_state_dict(state)
    return widened


def pixart_components(folder: Path, image_encoder_folder: Path | None = None) -> dict[str, Any]:
    """The recipe's starting point: PixArt-Sigma's transformer, widened to [noisy | condition] with the
    T5 caption projection dropped, its VAE (frozen), an optional CLIP image encoder, and a new
    identity-initialised projection. Local files only."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler
    from transformers import CLIPVisionModelWithProjection

    from synthesis.architecture import SCHEDULER_CONFIG

    local = {"local_files_only": True}
    try:
        transformer = widen_patch_embedding(PixArtTransformer2DModel.from_pretrained(folder / "transformer", **local))
        vae = AutoencoderKL.from_pretrained(folder / "vae", **local)
        image_encoder = (
            CLIPVisionModelWithProjection.from_pretrained(image_encoder_folder, **local)
            if image_encoder_folder is not None
            else None
        )
    except Exception as e:  # the libraries raise OSError, ValueError, KeyError...
        raise ModelLoadError(f"cannot load a PixArt-Sigma start from {folder}: {type(e).__name__}: {e}") from e
    embed = int(image_encoder.config.projection_dim) if image_encoder is not None else 0
    projection = CCProjection(in_channel=embed + 4, out_channel=int(transformer.config.cross_attention_dim))
    projection.reset_to_identity()
    return {
        "transformer": transformer,
        "cc_projection": projection,
        "scheduler": DPMSolverMultistepScheduler(**SCHEDULER_CONFIG),
        "vae": vae,
        "image_encoder": image_encoder,
    }


@dataclass
class TrainingModel:
    """The components one step touches; ``loss`` is the whole forward pass of a training step."""

    transformer: PixArtTransformer2DModel
    cc_projection: CCProjection
    vae: Any = None
    image_encoder: Any = None
    noise_scheduler: DDPMScheduler = field(default_factory=lambda: noise_schedule_like(None))

    @property
    def latent_channels(self) -> int:
        return int(self.transformer.config.in_channels) // 2

    def loss(
        self,
        condition: torch.Tensor,
        target: torch.Tensor,
        pose: torch.Tensor,
        generator: torch.Generator,
        drop: tuple[float, float, float] = (0.05, 0.05, 0.05),
        autocast: bool = False,
    ) -> torch.Tensor:
        """Epsilon MSE of a batch: images [B,1,H,W] in [0, 1], pose [B,4]; ``drop`` = (clip, both, latent)."""
        device = self.transformer.device
        b, c = condition.shape[0], self.latent_channels
        pa = condition.to(device) * 2 - 1
        tgt = target.to(device) * 2 - 1
        with torch.no_grad():
            cond_latent, target_latent, embeds = self._encode(pa, tgt, generator)
        noise = torch.randn(target_latent.shape, generator=generator).to(device)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (b,), generator=generator)
        timesteps = timesteps.to(device)
        noisy = self.noise_scheduler.add_noise(target_latent, noise, timesteps)

        u = torch.rand(b, generator=generator).to(device)
        p_clip, p_both, p_latent = drop
        drop_clip = u < p_clip
        drop_both = (u >= p_clip) & (u < p_clip + p_both)
        drop_latent = (u >= p_clip + p_both) & (u < p_clip + p_both + p_latent)

        context = pose.to(device)[:, None, :]
        if embeds is not None:
            embeds = embeds * (~(drop_clip | drop_both)).to(embeds.dtype)[:, None, None]
            context = torch.cat([embeds, context], dim=-1)
        tokens = self.cc_projection(context) * (~drop_both).to(torch.float32)[:, None, None]
        keep_latent = (~(drop_both | drop_latent)).to(torch.float32)[:, None, None, None]
        if is_aligned(self.transformer.config.in_channels, self.vae is None):
            cond_latent = aligned_condition(cond_latent, pose.to(device))
        model_in = torch.cat([noisy, cond_latent * keep_latent], dim=1)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            out = self.transformer(
                model_in,
                encoder_hidden_states=tokens,
                timestep=timesteps,
                added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                return_dict=False,
            )[0]
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            wanted = self.noise_scheduler.get_velocity(target_latent, noise, timesteps)
        else:
            wanted = noise
        return F.mse_loss(out[:, :c].float(), wanted)

    def _encode(
        self, pa: torch.Tensor, tgt: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        c = self.latent_channels
        if self.vae is None:
            cond_latent, target_latent = pa.expand(-1, c, -1, -1), tgt.expand(-1, c, -1, -1)
        else:
            ch = int(self.vae.config.in_channels)
            cond_latent = self.vae.encode(pa.expand(-1, ch, -1, -1)).latent_dist.mode()
            dist = self.vae.encode(tgt.expand(-1, ch, -1, -1)).latent_dist
            eps = torch.randn(dist.mean.shape, generator=generator).to(pa.device)
            target_latent = (dist.mean + dist.std * eps) * self.vae.config.scaling_factor
        embeds = None
        if self.image_encoder is not None:
            embeds = SvdrrPipeline.encode_image_embeds(self, pa)  # type: ignore[arg-type]
        return cond_latent.float(), target_latent.float(), embeds


def noise_schedule_like(scheduler: Any) -> DDPMScheduler:
    """The DDPM training schedule with the pipeline scheduler's betas (linear 1e-4..0.02, 1000 steps)."""
    cfg = scheduler.config if scheduler is not None else {}
    return DDPMScheduler(
        num_train_timesteps=int(cfg.get("num_train_timesteps", 1000)),
        beta_start=float(cfg.get("beta_start", 1e-4)),
        beta_end=float(cfg.get("beta_end", 0.02)),
        beta_schedule=str(cfg.get("beta_schedule", "linear")),
        prediction_type=str(cfg.get("prediction_type", "epsilon")),
    )


def make_optimizer(model: TrainingModel, stage: Stage, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with the transformer at the stage lr and ``cc_projection`` at ``projection_lr_mult`` x."""
    groups = [
        {"params": [p for p in model.transformer.parameters() if p.requires_grad], "lr": stage.lr},
        {"params": list(model.cc_projection.parameters()), "lr": stage.lr * config.projection_lr_mult},
    ]
    return torch.optim.AdamW(groups, lr=stage.lr, weight_decay=config.weight_decay)


def make_lr_schedule(optimizer: torch.optim.Optimizer, stage: Stage, config: TrainConfig) -> Any:
    """Linear warm-up over min(warmup_steps, stage steps), then constant."""
    warmup = min(config.warmup_steps, stage.steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)


# --- the run -----------------------------------------------------------------------------------


def _batch_indices(n: int, position: int, batch_size: int, seed: int, stage_index: int) -> list[int]:
    """Samples position..position+batch_size of the stage's data order: a fresh shuffle per epoch."""
    indices = []
    for p in range(position, position + batch_size):
        epoch, offset = divmod(p, n)
        order = np.random.default_rng([seed, stage_index, epoch]).permutation(n)
        indices.append(int(order[offset]))
    return indices


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step under ``out_dir/checkpoints``, if any."""
    folder = Path(out_dir) / CHECKPOINTS_DIR
    found = [
        (int(p.name.split("-", 1)[1]), p)
        for p in folder.glob("step-*")
        if p.name.split("-", 1)[1].isdigit() and (p / TRAINER_STATE).is_file()
    ]
    return max(found)[1] if found else None


def _rng_states(generator: torch.Generator) -> dict[str, Any]:
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _restore_rng(states: dict[str, Any], generator: torch.Generator) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    generator.set_state(states["generator"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _save_checkpoint(out_dir: Path, model: TrainingModel, state: dict[str, Any]) -> Path:
    folder = out_dir / CHECKPOINTS_DIR
    final = folder / f"step-{state['step']}"
    temporary = folder / f".tmp-step-{state['step']}"
    shutil.rmtree(temporary, ignore_errors=True)
    model.transformer.save_pretrained(temporary / "transformer")
    model.cc_projection.save_pretrained(temporary / "cc_projection")
    torch.save(state, temporary / TRAINER_STATE)
    if final.exists():
        shutil.rmtree(final)
    os.replace(temporary, final)
    logger.info("checkpoint %s", final)
    return final


def _initial_components(config: TrainConfig) -> dict[str, Any]:
    if config.init_from is not None:
        components = dict(SvdrrPipeline.from_pretrained(config.init_from).components)
        components["transformer"] = grow_patch(
            components["transformer"], config.grow_patch, jitter=GROW_JITTER, seed=config.seed
        )
        return components
    if config.init_pixart is not None:
        return pixart_components(config.init_pixart, config.init_image_encoder)
    assert config.arch is not None
    components = build_components(config.arch, seed=config.seed)
    components["cc_projection"].reset_to_identity()
    return components


def _prepare_loss_log(path: Path, step: int) -> None:
    """Start the log, or keep only the rows up to the resumed step (a killed run may have logged more)."""
    rows: list[list[str]] = []
    if step > 0 and path.exists():
        with open(path, newline="") as fh:
            rows = [r for r in list(csv.reader(fh))[1:] if r and int(r[1]) <= step]
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows([["stage", "step", "loss", "lr"], *rows])


def train(
    config: TrainConfig,
    data_dir: str | Path,
    out_dir: str | Path,
    resume: bool = True,
    stop_after: int | None = None,
) -> Path:
    """Run (or resume) the stages; returns ``out_dir/model``, or the checkpoint where ``stop_after`` ended it.

    The model folder is in the published layout and loads with :meth:`SvdrrPipeline.from_pretrained`.
    """
    from tqdm import tqdm

    from synthesis.device import resolve_device

    out_dir = Path(out_dir)
    (out_dir / CHECKPOINTS_DIR).mkdir(parents=True, exist_ok=True)
    device = resolve_device(config.device)
    components = _initial_components(config)
    if config.prediction_type is not None:  # recorded in the saved scheduler config: the engine follows it
        scheduler = components["scheduler"]
        components["scheduler"] = type(scheduler).from_config(scheduler.config, prediction_type=config.prediction_type)
    generator = torch.Generator()
    checkpoint = latest_checkpoint(out_dir) if resume else None
    state: dict[str, Any] | None = None
    if checkpoint is not None:
        state = torch.load(checkpoint / TRAINER_STATE, weights_only=False)
        if state["config"] != config.fingerprint():
            raise SynthesisError(
                f"checkpoint {checkpoint} was made with other settings {state['config']!r}; "
                f"use a new --out folder or the same settings ({config.fingerprint()!r})"
            )
        components["transformer"] = PixArtTransformer2DModel.from_pretrained(checkpoint / "transformer")
        components["cc_projection"] = CCProjection.from_pretrained(checkpoint / "cc_projection")
        _restore_rng(state["rng"], generator)
        logger.info("resuming from %s (step %d)", checkpoint, state["step"])
    else:
        random.seed(config.seed)
        np.random.seed(config.seed)
        torch.manual_seed(config.seed)
        generator.manual_seed(config.seed)
    step = state["step"] if state else 0
    _prepare_loss_log(out_dir / LOSS_LOG, step)

    for name in ("vae", "image_encoder"):
        if components[name] is not None:
            components[name].to(device).eval().requires_grad_(False)
    model = TrainingModel(
        transformer=components["transformer"].to(device),
        cc_projection=components["cc_projection"].to(device).train().requires_grad_(True),
        vae=components["vae"],
        image_encoder=components["image_encoder"],
        noise_scheduler=noise_schedule_like(components["scheduler"]),
    )
    scale = 2 ** (len(model.vae.config.block_out_channels) - 1) if model.vae is not None else 1
    drop = (config.p_drop_clip, config.p_drop_both, config.p_drop_latent)
    autocast = device.type == "cuda"
    stage_end = 0
    with tqdm(total=config.total_steps, initial=step, disable=not config.progress, unit="step") as bar:
        for stage_index, stage in enumerate(config.stages):
            stage_end += stage.steps
            if step >= stage_end:
                continue
            if stage.resolution % (scale * int(model.transformer.config.patch_size)):
                raise SynthesisError(f"stage resolution {stage.resolution} is not a multiple of VAE x patch")
            model.transformer = stage_transformer(model.transformer, stage.resolution // scale)
            model.transformer.train().requires_grad_(True)
            if config.gradient_checkpointing:
                model.transformer.enable_gradient_checkpointing()
            dataset = DrrTrainingPairs(data_dir, stage.resolution, config.include)
            optimizer = make_optimizer(model, stage, config)
            lr_schedule = make_lr_schedule(optimizer, stage, config)
            position = 0
            if state is not None and state["stage"] == stage_index:
                optimizer.load_state_dict(state["optimizer"])
                lr_schedule.load_state_dict(state["lr_schedule"])
                position = state["position"]
            bar.set_description(f"stage {stage_index + 1}/{len(config.stages)} {stage.resolution}px")
            while step < stage_end:
                indices = _batch_indices(len(dataset), position, stage.batch_size, config.seed, stage_index)
                position += stage.batch_size
                condition, target, pose = dataset.batch(indices)
                loss = model.loss(condition, target, pose, generator, drop, autocast=autocast)
                if not torch.isfinite(loss):
                    raise SynthesisError(f"loss is {loss.item()} at step {step + 1} (stage {stage_index + 1})")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                params = [p for g in optimizer.param_groups for p in g["params"]]
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                lr_schedule.step()
                step += 1
                with open(out_dir / LOSS_LOG, "a", newline="") as fh:
                    csv.writer(fh).writerow([stage_index, step, f"{loss.item():.8g}", f"{lr:.8g}"])
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4f}")
                stopping = stop_after is not None and step >= stop_after
                if step % config.checkpoint_every == 0 or step == stage_end or stopping:
                    saved = _save_checkpoint(
                        out_dir,
                        model,
                        {
                            "step": step,
                            "stage": stage_index,
                            "position": position,
                            "optimizer": optimizer.state_dict(),
                            "lr_schedule": lr_schedule.state_dict(),
                            "rng": _rng_states(generator),
                            "config": config.fingerprint(),
                        },
                    )
                    if stopping:
                        # A run stopped early (for time) still leaves a usable model beside its checkpoint.
                        _save_model(components, model, out_dir / f"{MODEL_DIR}-step-{step}")
                        return saved
    return _save_model(components, model, out_dir / MODEL_DIR)


def _save_model(components: dict[str, Any], model: TrainingModel, folder: Path) -> Path:
    """The trained model in the published layout (float32, CPU)."""
    pipe = SvdrrPipeline(
        transformer=model.transformer.to("cpu").eval().requires_grad_(False),
        cc_projection=model.cc_projection.to("cpu").eval().requires_grad_(False),
        scheduler=components["scheduler"],
        vae=model.vae.to("cpu") if model.vae is not None else None,
        image_encoder=model.image_encoder.to("cpu") if model.image_encoder is not None else None,
    )
    pipe.save_pretrained(folder)
    logger.info("saved model %s (identity %s)", folder, pipe.model_identity[:12])
    return folder


def parse_stages(text: str) -> tuple[Stage, ...]:
    """``RES:STEPS:BATCH:LR[,...]``, e.g. ``256:200000:64:5e-6,512:100000:32:3e-6``."""
    stages = []
    for part in [p for p in text.split(",") if p.strip()]:
        fields: Sequence[str] = part.strip().split(":")
        if len(fields) != 4:
            raise SynthesisError(f"a stage is RES:STEPS:BATCH:LR, got {part!r}")
        try:
            stages.append(Stage(int(fields[0]), int(fields[1]), int(fields[2]), float(fields[3])))
        except ValueError as e:
            raise SynthesisError(f"a stage is RES:STEPS:BATCH:LR with numbers, got {part!r}") from e
    if not stages:
        raise SynthesisError(f"no stages in {text!r}")
    return tuple(stages)
