"""Component configurations: the published SV-DRR shapes and small ones for tests and our own models.

``build_components`` makes *randomly initialised* components from a :class:`Architecture`. That is
what benchmarks (speed does not depend on the weights), tests and the trainer start from; it is never
a model to synthesise with. Published sizes (svdrr-spec.md): 28 layers, 16 heads x 72 = 1152, patch
2, 8 in / 8 out channels (learned sigma), sample_size = resolution / 8, interpolation_scale =
sample_size / 64, an SDXL-type VAE and a ViT-L/14 CLIP image encoder with 768-d embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dicomnode.errors import SynthesisError

SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "algorithm_type": "dpmsolver++",
    "solver_order": 2,
    "prediction_type": "epsilon",
}

SDXL_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}

VIT_L14_CONFIG: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "patch_size": 14,
    "image_size": 224,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}


@dataclass(frozen=True)
class Architecture:
    """Shapes of a model. ``vae`` / ``clip`` None means pixel space / pose-only token."""

    resolution: int
    layers: int = 28
    heads: int = 16
    head_dim: int = 72
    patch_size: int = 2
    learned_sigma: bool = True
    vae: dict[str, Any] | None = None
    clip: dict[str, Any] | None = None
    pixel_channels: int = 1  # latent channels in pixel space (no VAE)
    aligned_condition: bool = False  # pixel space: also the PA foreshortened to the view (synthesis.aligned)

    def __post_init__(self) -> None:
        scale = self.vae_scale_factor
        if self.resolution % (scale * self.patch_size):
            raise SynthesisError(
                f"resolution {self.resolution} must be a multiple of {scale * self.patch_size} (VAE x patch)"
            )
        if min(self.layers, self.heads, self.head_dim, self.pixel_channels) < 1:
            raise SynthesisError(f"architecture sizes must be positive: {self}")
        if self.aligned_condition and (self.vae or self.pixel_channels != 1):
            raise SynthesisError("the aligned condition is for pixel-space models with one channel")

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae["block_out_channels"]) - 1) if self.vae else 1

    @property
    def latent_channels(self) -> int:
        return int(self.vae["latent_channels"]) if self.vae else self.pixel_channels

    @property
    def hidden(self) -> int:
        return self.heads * self.head_dim

    @property
    def sample_size(self) -> int:
        return self.resolution // self.vae_scale_factor

    def transformer_config(self) -> dict[str, Any]:
        c = self.latent_channels
        return {
            "num_attention_heads": self.heads,
            "attention_head_dim": self.head_dim,
            "in_channels": (3 if self.aligned_condition else 2) * c,
            "out_channels": 2 * c if self.learned_sigma else c,
            "num_layers": self.layers,
            "cross_attention_dim": self.hidden,
            "sample_size": self.sample_size,
            "patch_size": self.patch_size,
            "norm_type": "ada_norm_single",
            "caption_channels": None,
            "use_additional_conditions": False,
            "interpolation_scale": max(self.sample_size / 64, 0.125),
        }

    def projection_in(self) -> int:
        return (int(self.clip["projection_dim"]) if self.clip else 0) + 4


def published(resolution: int) -> Architecture:
    """The published svdrr-dit-fb-{256,512,1024} shapes (about 605 M transformer parameters)."""
    if resolution not in (256, 512, 1024):
        raise SynthesisError(f"published models exist at 256, 512 and 1024 px, not {resolution}")
    return Architecture(resolution=resolution, vae=dict(SDXL_VAE_CONFIG), clip=dict(VIT_L14_CONFIG))


def tiny(
    resolution: int = 32, *, vae: bool = True, clip: bool = True, learned_sigma: bool = True
) -> Architecture:
    """A few-layer model for tests: seconds on a CPU."""
    tiny_vae = {
        **SDXL_VAE_CONFIG,
        "block_out_channels": [8, 16],
        "down_block_types": ["DownEncoderBlock2D"] * 2,
        "up_block_types": ["UpDecoderBlock2D"] * 2,
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "sample_size": resolution,
    }
    tiny_clip = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "patch_size": 8,
        "image_size": 32,
        "projection_dim": 16,
        "hidden_act": "quick_gelu",
    }
    return Architecture(
        resolution=resolution,
        layers=2,
        heads=2,
        head_dim=16,
        patch_size=2,
        learned_sigma=learned_sigma,
        vae=tiny_vae if vae else None,
        clip=tiny_clip if clip else None,
    )


def demo(
    resolution: int = 64,
    *,
    layers: int = 6,
    heads: int = 4,
    head_dim: int = 32,
    patch_size: int = 4,
    aligned_condition: bool = False,
) -> Architecture:
    """The shipped demo model's shape: pixel space, pose-only token, patch 4, ~1.75 M parameters.

    Small enough to train on a CPU in under an hour and to ship (< 25 MB of weights). The keywords
    give other pixel-space shapes of the same kind (``dicomnode train --arch demo --shape``);
    ``aligned_condition`` adds the view-aligned input channel (:mod:`synthesis.aligned`).
    """
    return Architecture(
        resolution=resolution,
        layers=layers,
        heads=heads,
        head_dim=head_dim,
        patch_size=patch_size,
        vae=None,
        clip=None,
        aligned_condition=aligned_condition,
    )


def build_components(arch: Architecture, seed: int = 0) -> dict[str, Any]:
    """Randomly initialised components for ``SvdrrPipeline(**components)`` (fixed seed)."""
    import torch
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtTransformer2DModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from synthesis.projection import CCProjection

    torch.manual_seed(seed)
    components: dict[str, Any] = {
        "transformer": PixArtTransformer2DModel(**arch.transformer_config()),
        "cc_projection": CCProjection(in_channel=arch.projection_in(), out_channel=arch.hidden),
        "scheduler": DPMSolverMultistepScheduler(**SCHEDULER_CONFIG),
        "vae": AutoencoderKL(**arch.vae) if arch.vae else None,
        "image_encoder": CLIPVisionModelWithProjection(CLIPVisionConfig(**arch.clip)) if arch.clip else None,
    }
    for name in ("transformer", "cc_projection", "vae", "image_encoder"):
        if components[name] is not None:
            components[name].eval().requires_grad_(False)
    return components
