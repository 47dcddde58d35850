"""Denoising the views of several requests (jobs) together, each view's output unchanged by its company.

A worker that holds several jobs for the same model and sampling settings denoises all their views
in shared batches (``max_batch`` rows, twice that with CFG), which keeps a GPU busy where one job's
few views would not. The contract is that batching never changes an image:

* every view's initial noise comes from its own generator, seeded from the job's seed and the
  view's own angles (:func:`synthesis.views.view_seed`), never from its place in a batch;
* every chunk is padded to exactly ``max_batch`` rows (the padding is computed and thrown away), so
  each matrix product always has the same shape. The kernels' reduction order then does not depend
  on how many views share the chunk, and a view's pixels are bit-identical whether its job ran
  alone or with others, at any position (a CPU test checks equality, not closeness).

Inputs of one call must share the model's resolution (:func:`synthesis.radiograph.prepare_radiograph`
gives that).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dicomnode.errors import SynthesisError
from synthesis.pipeline import SvdrrPipeline, SvdrrPipelineOutput
from synthesis.views import View, make_views


@dataclass(frozen=True)
class BatchRequest:
    """One job's request: a prepared (R, R) image in [0, 1], its views, and its seed."""

    image: np.ndarray | torch.Tensor
    azimuths: Sequence[float]
    elevations: Sequence[float] | None
    seed: int


@dataclass
class _Row:
    request: int
    view: View
    generator: torch.Generator


@torch.inference_mode()
def synthesize_many(
    pipe: SvdrrPipeline,
    requests: Sequence[BatchRequest],
    *,
    num_inference_steps: int,
    guidance_scale: float,
    max_batch: int,
) -> list[SvdrrPipelineOutput]:
    """One output per request, in order, from shared fixed-size batches (see the module docstring)."""
    if not requests:
        return []
    if num_inference_steps < 1 or guidance_scale < 1.0 or max_batch < 1:
        raise SynthesisError(
            f"steps {num_inference_steps}, guidance {guidance_scale}, max_batch {max_batch}: must be >= 1"
        )
    t_start = time.perf_counter()
    images: list[torch.Tensor] = []
    embeds: list[torch.Tensor | None] = []
    conds: list[torch.Tensor] = []
    views: list[tuple[View, ...]] = []
    seeds: list[tuple[int | None, ...]] = []
    rows: list[_Row] = []
    for i, request in enumerate(requests):
        x = pipe._image_tensor(request.image)
        if images and x.shape != images[0].shape:
            raise SynthesisError(f"request {i}: image {tuple(x.shape)} differs from {tuple(images[0].shape)}")
        images.append(x)
        embeds.append(pipe.encode_image_embeds(x))
        conds.append(pipe.encode_condition_latent(x))
        request_views = make_views(request.azimuths, request.elevations)
        generators, request_seeds = pipe._generators(int(request.seed), request_views)
        views.append(request_views)
        seeds.append(request_seeds)
        rows += [_Row(i, v, g) for v, g in zip(request_views, generators, strict=True)]
    height, width = images[0].shape[-2:]

    decoded: list[torch.Tensor] = []
    for start in range(0, len(rows), max_batch):
        chunk = rows[start : start + max_batch]
        latents = pipe.prepare_latents([r.generator for r in chunk], height, width)
        pose = torch.tensor([r.view.pose() for r in chunk], dtype=torch.float32, device=latents.device)[:, None, :]
        if embeds[0] is not None:
            pose = torch.cat([torch.cat([_present(embeds[r.request]) for r in chunk]), pose], dim=-1)
        cond = torch.cat([pipe.condition_for(conds[r.request], [r.view]) for r in chunk])
        pad = max_batch - len(chunk)
        if pad:  # same shapes for every chunk: see the module docstring
            latents, pose, cond = (torch.cat([t, t[-1:].expand(pad, *t.shape[1:])]) for t in (latents, pose, cond))
        projection: Any = pipe.cc_projection  # type: ignore[attr-defined]  # registered module
        tokens = projection(pose.to(projection.dtype))
        latents = pipe._denoise(latents, tokens, cond, num_inference_steps, guidance_scale, _NoProgress())
        decoded.append(pipe.decode_latents(latents)[: len(chunk)])
    images_out = torch.cat(decoded).cpu().numpy().astype(np.float32)

    outputs, offset = [], 0
    total_s = time.perf_counter() - t_start
    for i in range(len(requests)):
        n = len(views[i])
        outputs.append(
            SvdrrPipelineOutput(
                images=images_out[offset : offset + n],
                views=views[i],
                seeds=seeds[i],
                timings={"total_s": total_s, "batched_requests": float(len(requests))},
            )
        )
        offset += n
    return outputs


def _present(embeds: torch.Tensor | None) -> torch.Tensor:
    assert embeds is not None  # every request has them when the model has an image encoder
    return embeds


class _NoProgress:
    def update(self, n: int = 1) -> None:
        pass

