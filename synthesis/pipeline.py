"""The SV-DRR pipeline: one PA radiograph in, views at other angles out.

Reads top to bottom as diffusers pipelines do: check inputs -> encode the condition once (CLIP
embedding, VAE latent) -> per chunk of views: prepare latents, denoise with CFG folded into the
batch, decode -> output dataclass. Every convention follows ``shared/svdrr-spec.md``; the pitfalls
it lists are each tested in ``tests/test_pipeline.py``.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DiffusionPipeline, DPMSolverMultistepScheduler, PixArtTransformer2DModel
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPVisionModelWithProjection

from dicomnode.errors import SynthesisError
from synthesis.aligned import aligned_condition, is_aligned
from synthesis.checkpoint import WEIGHTED, load_components, save_components
from synthesis.fastpath import FastPath, plan_chunks
from synthesis.identity import identity_of_folder, identity_of_modules
from synthesis.projection import CCProjection
from synthesis.views import View, make_views, view_seed

logger = logging.getLogger(__name__)

# OpenAI CLIP normalisation (the image encoder was trained with these).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RANGE_TOLERANCE = 1e-3


@dataclass
class SvdrrPipelineOutput(BaseOutput):  # type: ignore[misc]
    """``images``: float32 (n_views, H, W) in [0, 1] (numpy or torch); one entry per requested view."""

    images: Any
    views: tuple[View, ...] = ()
    seeds: tuple[int | None, ...] = ()
    timings: dict[str, float] = field(default_factory=dict)


class SvdrrPipeline(DiffusionPipeline):  # type: ignore[misc]
    """View-conditioned DiT (PixArt-Sigma backbone) synthesising novel radiograph views.

    ``vae`` and ``image_encoder`` are optional: without a VAE the model works in pixel space (the
    image is its own latent); without an image encoder the cross-attention token is the projected
    pose alone. Both are for small models trained with our own trainer; the published checkpoints
    have all five components.
    """

    model_cpu_offload_seq = "image_encoder->cc_projection->vae->transformer->vae"
    _optional_components = ["vae", "image_encoder"]

    def __init__(
        self,
        transformer: PixArtTransformer2DModel,
        cc_projection: CCProjection,
        scheduler: DPMSolverMultistepScheduler,
        vae: AutoencoderKL | None = None,
        image_encoder: CLIPVisionModelWithProjection | None = None,
    ):
        super().__init__()
        self.register_modules(
            vae=vae,
            image_encoder=image_encoder,
            transformer=transformer,
            cc_projection=cc_projection,
            scheduler=scheduler,
        )
        self._check_components()
        self._model_identity: str | None = None
        self._fp32_vae: AutoencoderKL | None = None
        # The eager reference until synthesis.fastpath.enable_fast_path switches it.
        self.fast_path = FastPath()
        self.cuda_graphs = False

    # ----------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        folder: str | Path,
        torch_dtype: torch.dtype = torch.float32,
        device: str | torch.device | None = None,
    ) -> SvdrrPipeline:
        """Load a folder in the published layout (local files only) with the stock classes."""
        folder = Path(folder)
        components = load_components(folder, torch_dtype=torch_dtype)
        pipe = cls(**components)
        pipe._model_identity = identity_of_folder(folder, [n for n in WEIGHTED if components[n] is not None])
        if device is not None:
            pipe.to(device)
        logger.info("loaded model %s (identity %s) in %s", folder, pipe.model_identity[:12], torch_dtype)
        return pipe

    def save_pretrained(self, save_directory: str | Path, **_: Any) -> None:  # type: ignore[override]
        save_components(Path(save_directory), self.components, diffusers.__version__)

    @property
    def model_identity(self) -> str:
        """SHA-256 of the weights (hex): provenance key and source of the DICOM Device UID."""
        if self._model_identity is None:
            self._model_identity = identity_of_modules({n: getattr(self, n) for n in WEIGHTED})
        return self._model_identity

    def _check_components(self) -> None:
        cfg = self.transformer.config
        c = self.latent_channels
        if cfg.in_channels != 2 * c and not self.aligned:
            raise SynthesisError(
                f"transformer in_channels must be 2 x latent channels ({2 * c}): [noisy | condition] "
                f"(or 3 in pixel space: [noisy | PA | PA foreshortened]), got {cfg.in_channels}"
            )
        if cfg.out_channels not in (c, 2 * c):
            raise SynthesisError(
                f"transformer out_channels must be {c} or {2 * c} (learned sigma), got {cfg.out_channels}"
            )
        embed_dim = self.image_encoder.config.projection_dim if self.image_encoder is not None else 0
        want_in = embed_dim + 4
        if self.cc_projection.config.in_channel != want_in:
            raise SynthesisError(
                f"cc_projection in_channel must be image embedding ({embed_dim}) + 4 pose = {want_in}, "
                f"got {self.cc_projection.config.in_channel}"
            )
        if self.cc_projection.config.out_channel != cfg.cross_attention_dim:
            raise SynthesisError(
                f"cc_projection out_channel ({self.cc_projection.config.out_channel}) must equal the "
                f"transformer cross_attention_dim ({cfg.cross_attention_dim})"
            )

    # -------------------------------------------------------------------------------- geometry
    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1

    @property
    def aligned(self) -> bool:
        """A pixel-space model that also takes the PA foreshortened to each view (synthesis.aligned)."""
        return is_aligned(self.transformer.config.in_channels, self.vae is None)

    @property
    def latent_channels(self) -> int:
        if self.vae is not None:
            return int(self.vae.config.latent_channels)
        return int(self.transformer.config.in_channels) // 2

    @property
    def resolution(self) -> int:
        """The native image side in pixels (256, 512 or 1024 for the published models)."""
        return int(self.transformer.config.sample_size) * self.vae_scale_factor

    @property
    def size_multiple(self) -> int:
        return self.vae_scale_factor * int(self.transformer.config.patch_size)

    # ----------------------------------------------------------------------------- conditioning
    def _image_tensor(self, image: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(H, W) in [0, 1] -> (1, 1, H, W) float32 in [-1, 1] on the execution device."""
        x = torch.as_tensor(np.asarray(image) if not isinstance(image, torch.Tensor) else image)
        if x.ndim != 2:
            raise SynthesisError(f"image must be a 2-D grayscale array (H, W), got shape {tuple(x.shape)}")
        x = x.detach().to(torch.float32)
        if not bool(torch.isfinite(x).all()):
            raise SynthesisError("image contains NaN or infinite values")
        lo, hi = float(x.min()), float(x.max())
        if lo < -RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
            raise SynthesisError(f"image values must lie in [0, 1], got [{lo:.4g}, {hi:.4g}]")
        h, w = x.shape
        m = self.size_multiple
        if h % m or w % m:
            raise SynthesisError(
                f"image sides must be multiples of {m}, got {h}x{w} (model resolution {self.resolution})"
            )
        return (x.clamp(0, 1) * 2 - 1)[None, None].to(self._execution_device)

    def encode_image_embeds(self, x: torch.Tensor) -> torch.Tensor | None:
        """CLIP ``image_embeds`` [1, 1, E] of the [-1, 1] image, or None without an image encoder.

        Straight bicubic resize to the encoder's input size (align_corners=True, no antialias, no
        crop), [0, 1], CLIP mean/std. The stock CLIPImageProcessor centre-crops: not used (spec).
        """
        if self.image_encoder is None:
            return None
        size = int(self.image_encoder.config.image_size)
        rgb = x.expand(-1, 3, -1, -1)
        rgb = F.interpolate(rgb, size=(size, size), mode="bicubic", align_corners=True, antialias=False)
        rgb = (rgb + 1) / 2
        mean = torch.tensor(CLIP_MEAN, device=rgb.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=rgb.device).view(1, 3, 1, 1)
        pixel_values = ((rgb - mean) / std).to(self.image_encoder.dtype)
        embeds = self.image_encoder(pixel_values=pixel_values).image_embeds  # not L2-normalised
        return embeds.to(torch.float32)[:, None, :]

    def encode_condition_latent(self, x: torch.Tensor) -> torch.Tensor:
        """The conditioning latent: VAE ``latent_dist.mode()``, NOT multiplied by the scaling factor.

        In pixel space the image itself, replicated to the latent channels.
        """
        if self.vae is None:
            return x.expand(-1, self.latent_channels, -1, -1).to(torch.float32)
        rgb = x.expand(-1, int(self.vae.config.in_channels), -1, -1).to(self.vae.dtype)
        return self.vae.encode(rgb).latent_dist.mode().to(torch.float32)

    def condition_for(self, cond_latent: torch.Tensor, views: Sequence[View]) -> torch.Tensor:
        """The transformer's condition channels for each view: (n, ., H, W), n = len(views).

        The condition latent itself for every view, or for an aligned model [PA | PA foreshortened].
        """
        if not self.aligned:
            return cond_latent.expand(len(views), -1, -1, -1)
        pose = torch.tensor([v.pose() for v in views], dtype=torch.float32, device=cond_latent.device)
        return aligned_condition(cond_latent, pose)

    def encode_tokens(self, views: Sequence[View], image_embeds: torch.Tensor | None) -> torch.Tensor:
        """Cross-attention context: ``cc_projection([image_embeds | pose])`` -> [n, 1, D]."""
        pose = torch.tensor([v.pose() for v in views], dtype=torch.float32, device=self._execution_device)
        pose = pose[:, None, :]
        if image_embeds is not None:
            pose = torch.cat([image_embeds.expand(len(views), -1, -1), pose], dim=-1)
        tokens = self.cc_projection(pose.to(self.cc_projection.dtype))
        return tokens

    # --------------------------------------------------------------------------------- sampling
    def prepare_latents(self, generators: Sequence[torch.Generator], height: int, width: int) -> torch.Tensor:
        """One initial latent per view, each drawn from its own generator (batch-independent)."""
        shape = (1, self.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        noise = [
            randn_tensor(shape, generator=g, device=self._execution_device, dtype=torch.float32)
            for g in generators
        ]
        return torch.cat(noise) * self.scheduler.init_noise_sigma

    def _denoise(
        self,
        latents: torch.Tensor,
        tokens: torch.Tensor,
        cond: torch.Tensor,
        num_inference_steps: int,
        guidance_scale: float,
        progress: Any,
    ) -> torch.Tensor:
        n = latents.shape[0]
        c = self.latent_channels
        dtype = self.transformer.dtype
        do_cfg = guidance_scale > 1.0
        scheduler = copy.deepcopy(self.scheduler)  # the multistep solver keeps state: one per chunk
        scheduler.set_timesteps(num_inference_steps, device=latents.device)
        cond = cond.expand(n, -1, -1, -1)  # (1 or n, ., H, W): see condition_for
        if do_cfg:
            # Null branch first (spec: batch [uncond, cond]): all-zero token and all-zero latent.
            context = torch.cat([torch.zeros_like(tokens), tokens]).to(dtype)
            cond = torch.cat([torch.zeros_like(cond), cond])
        else:
            context = tokens.to(dtype)
        for t in scheduler.timesteps:
            model_in = torch.cat([latents, latents]) if do_cfg else latents
            model_in = scheduler.scale_model_input(model_in, t)
            model_in = torch.cat([model_in, cond], dim=1).to(dtype)
            timestep = t.expand(model_in.shape[0]).to(latents.device)
            if self.cuda_graphs:  # a new graph replay: the previous step's outputs are consumed
                torch.compiler.cudagraph_mark_step_begin()
            out = self.transformer(
                model_in,
                encoder_hidden_states=context,
                timestep=timestep,
                added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                return_dict=False,
            )[0]
            # Learned sigma: channels c..2c are variance, unused. What the first c channels mean (epsilon
            # for the published models, v for our pixel-space demo) is the scheduler config's
            # prediction_type; CFG is linear, so it combines either the same way.
            eps = out[:, :c].to(torch.float32)
            if self.cuda_graphs:  # graph outputs live in a pool the next replay overwrites
                eps = eps.clone()
            if do_cfg:
                eps_uncond, eps_cond = eps.chunk(2)
                eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
            latents = scheduler.step(eps, t, latents, return_dict=False)[0]
            progress.update()
        return latents

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> (n, H, W) float32 in [0, 1] (gray = mean of the decoded channels)."""
        if self.vae is None:
            images = latents
        else:
            images = self._vae_decode(self.vae, latents)
            if not bool(torch.isfinite(images).all()) and self.vae.dtype != torch.float32:
                logger.warning(
                    "VAE decode in %s gave non-finite values; decoding again in float32", self.vae.dtype
                )
                if self._fp32_vae is None:
                    self._fp32_vae = copy.deepcopy(self.vae).to(torch.float32)
                images = self._vae_decode(self._fp32_vae, latents)
        images = (images.to(torch.float32) / 2 + 0.5).clamp(0, 1)
        return images.mean(dim=1)

    @staticmethod
    def _vae_decode(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
        z = latents / vae.config.scaling_factor
        shift = getattr(vae.config, "shift_factor", None)
        if shift:
            z = z + shift
        return vae.decode(z.to(vae.dtype), return_dict=False)[0]

    # ------------------------------------------------------------------------------------- call
    @torch.inference_mode()
    def __call__(
        self,
        image: np.ndarray | torch.Tensor,
        azimuths: Sequence[float],
        elevations: Sequence[float] | None = None,
        num_inference_steps: int = 20,
        guidance_scale: float = 3.0,
        generator: int | torch.Generator | Sequence[torch.Generator] | None = None,
        max_batch: int = 8,
        output_type: str = "np",
        return_dict: bool = True,
    ) -> SvdrrPipelineOutput | tuple[Any]:
        """Synthesise one image per (azimuth, elevation), degrees, from a PA ``image`` in [0, 1].

        ``generator``: one ``torch.Generator`` per view, or an int seed from which each view's
        generator is derived from the seed and the view's own angles (:func:`views.view_seed`), so a
        view's output never depends on which other views share the call. ``max_batch``: views
        denoised together (the transformer sees twice as many rows with CFG); on the fast path
        (:mod:`synthesis.fastpath`) a short chunk is padded to a static size and the padding dropped.
        """
        t_start = time.perf_counter()
        views = make_views(azimuths, elevations)
        generators, seeds = self._generators(generator, views)
        if num_inference_steps < 1:
            raise SynthesisError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if guidance_scale < 1.0:
            raise SynthesisError(f"guidance_scale must be >= 1.0, got {guidance_scale}")
        if max_batch < 1:
            raise SynthesisError(f"max_batch must be >= 1, got {max_batch}")
        if output_type not in ("np", "pt"):
            raise SynthesisError(f"output_type must be 'np' or 'pt', got {output_type!r}")

        x = self._image_tensor(image)
        height, width = x.shape[-2:]
        image_embeds = self.encode_image_embeds(x)
        cond_latent = self.encode_condition_latent(x)
        t_condition = time.perf_counter()

        # With fast_path.pad_batches a short chunk is padded with copies of its last view (static
        # shapes for compiled modules); rows never mix, and the copies are dropped after decoding.
        chunks = plan_chunks(len(views), max_batch, self.fast_path.pad_batches)
        outputs = []
        denoise_s = decode_s = 0.0
        with self.progress_bar(total=len(chunks) * num_inference_steps) as progress:
            for chunk, size in chunks:
                t0 = time.perf_counter()
                chunk_views = [views[i] for i in chunk]
                latents = self.prepare_latents([generators[i] for i in chunk], height, width)
                tokens = self.encode_tokens(chunk_views, image_embeds)
                cond = self.condition_for(cond_latent, chunk_views)
                pad = size - len(chunk)
                if pad:
                    latents = torch.cat([latents, latents[-1:].expand(pad, -1, -1, -1)])
                    tokens = torch.cat([tokens, tokens[-1:].expand(pad, -1, -1)])
                    cond = torch.cat([cond, cond[-1:].expand(pad, -1, -1, -1)])
                latents = self._denoise(latents, tokens, cond, num_inference_steps, guidance_scale, progress)
                t1 = time.perf_counter()
                outputs.append(self.decode_latents(latents)[: len(chunk)])
                t2 = time.perf_counter()
                denoise_s += t1 - t0
                decode_s += t2 - t1
        images = torch.cat(outputs)
        timings = {
            "condition_s": t_condition - t_start,
            "denoise_s": denoise_s,
            "decode_s": decode_s,
            "total_s": time.perf_counter() - t_start,
        }
        result = images.cpu().numpy().astype(np.float32) if output_type == "np" else images
        if not return_dict:
            return (result,)
        return SvdrrPipelineOutput(images=result, views=views, seeds=seeds, timings=timings)

    @staticmethod
    def _generators(
        generator: int | torch.Generator | Sequence[torch.Generator] | None, views: Sequence[View]
    ) -> tuple[list[torch.Generator], tuple[int | None, ...]]:
        if generator is None:
            generator = int(torch.seed() & ((1 << 63) - 1))
        if isinstance(generator, int):
            seeds = tuple(view_seed(generator, v) for v in views)
            return [torch.Generator("cpu").manual_seed(s) for s in seeds], seeds
        if isinstance(generator, torch.Generator):
            if len(views) != 1:
                raise SynthesisError(
                    "one torch.Generator serves one view only; pass one generator per view or an int seed"
                )
            return [generator], (None,)
        generators = list(generator)
        if len(generators) != len(views):
            raise SynthesisError(
                f"got {len(generators)} generators for {len(views)} views: pass one per view"
            )
        return generators, tuple(None for _ in generators)
