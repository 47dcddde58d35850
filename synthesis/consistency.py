"""How well can the model ground this input? A score computed before anything is written.

The gate's score is the model's own **denoising error on the input at pose (0, 0)**: the prepared
input x0 (in the model's sample space: pixels in [-1, 1] for a pixel-space model, the scaled VAE
latent otherwise) is noised to a few fixed timesteps with a fixed generator,

    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,

the transformer is asked, conditioned on x0 itself at the identity pose (azimuth 0, elevation 0),
for its prediction (epsilon, v or sample, as the scheduler's ``prediction_type`` says), that
prediction is turned back into an estimate of x0, and the error is folded into one number in dB:

    score = -10 log10(mean over timesteps of MSE(x0_hat, x0))     (higher = better grounded).

At the high timesteps the noisy sample carries little of the input, so a model that has only
learned its training prior (the demo model knows one chest) predicts that prior and scores low on
anything else, whatever its condition says. A model that had learned to copy its condition at pose
(0, 0) could score well on any input with this method; for such a model the gate offers the
**unconditional** variant ``denoise-uncond`` (the null condition the sampler uses for
classifier-free guidance: zero token, zero latent), which no copying can fake. Measured on the
earlier 64 px demo model (dB; ``benchmarks/calibrate_gate.py``): conditional -- training PA views
21.7..22.7, real chest CR RG1 11.7, uniform grey 9.9; unconditional -- training 13.1..14.6, RG1 6.5,
uniform 9.3. The shipped 128 px model reads its PA through the view-aligned channel too, which at
(0, 0) is the input itself, yet its conditional score still separates: training PA views
19.0..21.4, shipped sample 21.0, RG1 11.7, uniform grey 12.7; so it is calibrated on the
conditional score.

A second, simpler score is the gate method ``identity-ssim`` (:func:`identity_ssim`): the SSIM
between the identity view (0, 0), synthesised in the same batch as the job's views, and the
prepared input. It costs a whole view and depends on the sampler settings (steps, guidance); the
denoising score costs one transformer call and does not. On the shipped demo model (3 steps,
guidance 1.5): shipped sample 0.76, uniform grey 0.53 (0.72 and 0.48 at 20 steps).

Everything here is deterministic for a given model, input and settings: the noise comes from a
CPU ``torch.Generator`` with a fixed seed, so a retried job gets the same score.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch loads lazily: only the worker and the calibration script score inputs
    import torch

    from synthesis.pipeline import SvdrrPipeline

#: Timesteps (of 1000 training steps) at which the input is noised: low, middle, high noise.
DEFAULT_TIMESTEPS: tuple[int, ...] = (250, 500, 750)
#: Seed of the gate's noise: fixed, so a score never changes between attempts.
DEFAULT_SEED = 20240229
#: The score methods the gate knows, by the name stored with each job.
METHODS: tuple[str, ...] = ("denoise", "denoise-uncond", "identity-ssim")


@dataclass(frozen=True)
class ConsistencyScore:
    """One gate score: ``value`` (higher = better grounded), the ``method`` that made it, and the
    per-timestep values behind it (dB for the denoising methods)."""

    method: str
    value: float
    parts: tuple[float, ...] = ()

    def describe(self) -> str:
        unit = "" if self.method == "identity-ssim" else " dB"
        return f"{self.method} {self.value:.2f}{unit}"


#: The score given to a perfect reconstruction (a finite number, so it can be stored anywhere).
MAX_DB = 100.0


def _to_db(mse: float) -> float:
    return MAX_DB if mse <= 10 ** (-MAX_DB / 10) else -10.0 * math.log10(mse)


def denoising_score(
    pipe: SvdrrPipeline,
    image: np.ndarray,
    *,
    conditional: bool = True,
    timesteps: Sequence[int] = DEFAULT_TIMESTEPS,
    seed: int = DEFAULT_SEED,
) -> ConsistencyScore:
    """The model's denoising error on ``image`` (float (R, R) in [0, 1]) at pose (0, 0), in dB.

    One transformer call with ``len(timesteps)`` rows. ``conditional`` False uses the null
    condition (zero token and zero condition latent) instead of the input itself.
    """
    import torch

    from synthesis.views import View

    with torch.inference_mode():
        x = pipe._image_tensor(image)
        cond = pipe.encode_condition_latent(x)
        target = _sample_space(pipe, cond)
        n = len(timesteps)
        t = torch.tensor([int(s) for s in timesteps], dtype=torch.long)
        acp = pipe.scheduler.alphas_cumprod.to(torch.float64)[t].to(torch.float32)
        alpha = acp.sqrt().view(n, 1, 1, 1).to(target.device)
        sigma = (1 - acp).sqrt().view(n, 1, 1, 1).to(target.device)
        g = torch.Generator("cpu").manual_seed(int(seed))
        eps = torch.randn((n, *target.shape[1:]), generator=g, dtype=torch.float32).to(target.device)
        x0 = target.expand(n, -1, -1, -1)
        noisy = alpha * x0 + sigma * eps
        tokens = pipe.encode_tokens([View(0.0, 0.0)] * n, pipe.encode_image_embeds(x))
        cond_in = pipe.condition_for(cond, [View(0.0, 0.0)] * n)
        if not conditional:
            tokens = torch.zeros_like(tokens)
            cond_in = torch.zeros_like(cond_in)
        dtype = pipe.transformer.dtype
        out = pipe.transformer(
            torch.cat([noisy, cond_in], dim=1).to(dtype),
            encoder_hidden_states=tokens.to(dtype),
            timestep=t.to(target.device),
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
            return_dict=False,
        )[0][:, : pipe.latent_channels].to(torch.float32)
        prediction = pipe.scheduler.config.prediction_type
        if prediction == "v_prediction":
            x0_hat = alpha * noisy - sigma * out
        elif prediction == "epsilon":
            x0_hat = (noisy - sigma * out) / alpha
        elif prediction == "sample":
            x0_hat = out
        else:  # pragma: no cover - the scheduler validates its own config
            raise ValueError(f"prediction_type {prediction!r} is not supported")
        mse = ((x0_hat - x0) ** 2).mean(dim=(1, 2, 3)).double().cpu().numpy()
    parts = tuple(_to_db(float(m)) for m in mse)
    method = "denoise" if conditional else "denoise-uncond"
    return ConsistencyScore(method=method, value=_to_db(float(mse.mean())), parts=parts)


def _sample_space(pipe: SvdrrPipeline, cond: torch.Tensor) -> torch.Tensor:
    """The input as the diffusion process sees it: pixels, or the VAE latent scaled for diffusion."""
    if pipe.vae is None:
        return cond
    shift = getattr(pipe.vae.config, "shift_factor", None) or 0.0
    return (cond - shift) * pipe.vae.config.scaling_factor


def identity_ssim(identity_view: np.ndarray, prepared: np.ndarray) -> ConsistencyScore:
    """SSIM between the synthesised identity view (0, 0) and the prepared input, both (R, R) in [0, 1]."""
    from synthesis.metrics import ssim

    return ConsistencyScore(method="identity-ssim", value=ssim(identity_view, prepared, data_range=1.0))


def score_input(pipe: SvdrrPipeline, image: np.ndarray, method: str) -> ConsistencyScore:
    """The gate score of ``image`` by ``method`` (one of :data:`METHODS`)."""
    if method == "denoise":
        return denoising_score(pipe, image, conditional=True)
    if method == "denoise-uncond":
        return denoising_score(pipe, image, conditional=False)
    if method == "identity-ssim":
        raise ValueError("identity-ssim is scored from the identity view synthesised with the job's views")
    raise ValueError(f"consistency method {method!r} is not one of {', '.join(METHODS)}")
