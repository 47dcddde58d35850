"""The view-aligned condition of small pixel-space models: the PA input foreshortened to the view.

A published SV-DRR model is conditioned on the PA input alone ([noisy | condition latent], spec);
it learns the geometry of turning the patient from 400 k steps of data. A model small enough to
train on a CPU does not get that far: it learns an average chest before it learns to read its input
(``benchmarks/demo-model-training.md``). Such a model may take one more input channel, the PA
squeezed about the image centre by ``|cos(azimuth)|`` across and ``cos(elevation)`` down, the
first-order geometry of the requested turn and tilt, so that the view's outline and the side of each
organ sit where the input puts them, and the network learns what to change from there (depth,
overlap, the lateral's new content). The transformer's input is then [noisy | PA | PA foreshortened]
(3 channels in pixel space): :func:`is_aligned` tells such a model by its shape.

The squeeze is an exact box filter of the piecewise-constant image (no aliasing), computed as two
small matrices per view from the relative pose the model already gets (``[-e, sin(-a), cos(a), 0]``,
radians), so the pipeline, the batcher, the consistency gate and the trainer share one function.
Outside the squeezed input the background is the image's black (-1 in the [-1, 1] range).
"""

from __future__ import annotations

import torch

MIN_SCALE = 0.05  # never squeezed below 5 % of the side (|cos| -> 0 at 90 degrees), as the baseline


def is_aligned(in_channels: int, pixel_space: bool) -> bool:
    """True for a pixel-space transformer with 3 input channels: [noisy | PA | PA foreshortened]."""
    return pixel_space and int(in_channels) == 3


def squeeze_matrices(scales: torch.Tensor, size: int, min_scale: float = MIN_SCALE) -> torch.Tensor:
    """(n, size, size) float64 matrices M with ``M @ v`` squeezing the vector v about its centre by each scale.

    Output pixel x covers input interval c + (x - c +- 0.5) / s; it takes the mean of the input over
    that interval (the overlap of the interval with each input pixel, times s). Scale 1 gives the
    identity. The evaluation's *foreshortened* baseline (:func:`synthesis.evaluate.foreshortened`)
    is the same squeeze.
    """
    s = scales.to(torch.float64).clamp(min_scale, 1.0)[:, None, None]
    centre = (size - 1) / 2
    x = torch.arange(size, dtype=torch.float64)[None, :, None]  # output pixel
    j = torch.arange(size, dtype=torch.float64)[None, None, :]  # input pixel
    lo = centre + (x - 0.5 - centre) / s
    hi = centre + (x + 0.5 - centre) / s
    overlap = (torch.minimum(hi, j + 0.5) - torch.maximum(lo, j - 0.5)).clamp(min=0)
    return overlap * s


def foreshorten(image: torch.Tensor, pose: torch.Tensor, background: float = -1.0) -> torch.Tensor:
    """Each image (n, c, H, W) squeezed for its view: width by |cos a|, height by cos e.

    ``pose``: (n, 4) relative poses as the model gets them (``View.pose()``): ``pose[:, 2]`` is
    cos(azimuth), ``pose[:, 0]`` minus the elevation in radians. Pixels beyond the squeezed input
    are ``background``.
    """
    n, _, h, w = image.shape
    pose = pose.to(torch.float64).reshape(n, -1)
    across = squeeze_matrices(pose[:, 2].abs(), w).to(image.device, torch.float32)
    down = squeeze_matrices(torch.cos(pose[:, 0]), h).to(image.device, torch.float32)
    shifted = image.to(torch.float32) - background
    out = torch.einsum("nyh,nchw,nxw->ncyx", down, shifted, across)
    return (out + background).to(image.dtype)


def aligned_condition(condition: torch.Tensor, pose: torch.Tensor) -> torch.Tensor:
    """[PA | PA foreshortened to each view]: (n, 2c, H, W) from the PA condition (1 or n, c, H, W)."""
    n = pose.shape[0]
    condition = condition.expand(n, -1, -1, -1)
    return torch.cat([condition, foreshorten(condition, pose)], dim=1)
