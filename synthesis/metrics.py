"""Image-quality metrics of a synthesised view against its ground-truth DRR: PSNR and SSIM.

The method is evaluated with SSIM and PSNR (svdrr-spec.md, "Views and data"). Both are written here
with numpy and scipy so that the numbers mean exactly what the docstrings say:

* PSNR = 10 log10(data_range^2 / MSE) in dB, infinite for identical images.
* SSIM as defined by Wang, Bovik, Sheikh and Simoncelli, "Image quality assessment: from error
  visibility to structural similarity", IEEE TIP 13(4), 2004: local means, variances and covariance
  under an 11 x 11 Gaussian window (sigma 1.5, normalised to sum 1), K1 = 0.01, K2 = 0.03,
  C1 = (K1 L)^2, C2 = (K2 L)^2 with L the data range, and the mean of the SSIM map over the valid
  region, the positions where the whole window lies inside the image (no padding). This matches
  scikit-image's ``structural_similarity(..., gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False)``.

Images are compared in float64 so that the metrics do not depend on the input dtype.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from dicomnode.errors import SynthesisError

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _pair(pred: np.ndarray, target: np.ndarray, data_range: float) -> tuple[np.ndarray, np.ndarray]:
    """Both images as float64 2-D arrays of one shape, or SynthesisError naming what is wrong."""
    x = np.asarray(pred, dtype=np.float64)
    y = np.asarray(target, dtype=np.float64)
    if x.ndim != 2 or x.shape != y.shape:
        raise SynthesisError(f"metrics need two 2-D images of one shape, got {x.shape} and {y.shape}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise SynthesisError("metrics need finite images; one contains NaN or infinite values")
    if not data_range > 0:
        raise SynthesisError(f"data_range must be > 0, got {data_range!r}")
    return x, y


def psnr(pred: np.ndarray, target: np.ndarray, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB; ``inf`` when the images are identical."""
    x, y = _pair(pred, target, data_range)
    mse = float(np.mean((x - y) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range**2 / mse)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """The 1-D Gaussian weights (sum 1) whose outer product is SSIM's 2-D window."""
    offsets = np.arange(size, dtype=np.float64) - (size - 1) / 2
    weights = np.exp(-(offsets**2) / (2 * sigma**2))
    return weights / weights.sum()


def _local_mean(image: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Gaussian-weighted local mean at every position where the window fits inside the image."""
    filtered = ndimage.correlate1d(image, weights, axis=0, mode="constant")
    filtered = ndimage.correlate1d(filtered, weights, axis=1, mode="constant")
    r = (len(weights) - 1) // 2
    return filtered[r : image.shape[0] - r, r : image.shape[1] - r]


def ssim_map(pred: np.ndarray, target: np.ndarray, data_range: float = 1.0) -> np.ndarray:
    """The local SSIM of every valid window position, shape (H - 10, W - 10) for an 11 x 11 window."""
    x, y = _pair(pred, target, data_range)
    if min(x.shape) < SSIM_WINDOW:
        raise SynthesisError(f"SSIM needs images of at least {SSIM_WINDOW} x {SSIM_WINDOW} pixels, got {x.shape}")
    w = gaussian_window()
    mu_x, mu_y = _local_mean(x, w), _local_mean(y, w)
    # Population (weights sum to 1) variances and covariance, as in Wang et al.
    var_x = _local_mean(x * x, w) - mu_x * mu_x
    var_y = _local_mean(y * y, w) - mu_y * mu_y
    cov_xy = _local_mean(x * y, w) - mu_x * mu_y
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    luminance = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
    structure = (2 * cov_xy + c2) / (var_x + var_y + c2)
    return luminance * structure


def ssim(pred: np.ndarray, target: np.ndarray, data_range: float = 1.0) -> float:
    """Mean structural similarity (Wang et al. 2004) over the valid region; 1 for identical images."""
    return float(np.mean(ssim_map(pred, target, data_range)))


def patch_grid_ratio(image: np.ndarray, block: int) -> float:
    """How strongly a ``block``-pixel grid shows: the mean absolute step between neighbouring pixels
    across block edges over the mean step between neighbours inside blocks (rows and columns alike).

    About 1 for an image without a grid (a DRR); a patch model whose tokens do not join up draws
    steps at its patch edges and scores above 1. A flat image scores 1.
    """
    x = np.asarray(image, dtype=np.float64)
    if x.ndim != 2 or not np.isfinite(x).all():
        raise SynthesisError(f"the grid ratio needs one finite 2-D image, got shape {x.shape}")
    if block < 2 or min(x.shape) < 2 * block:
        raise SynthesisError(f"the grid ratio needs a block >= 2 and an image of two blocks, got {block}, {x.shape}")
    steps_x, steps_y = np.abs(np.diff(x, axis=1)), np.abs(np.diff(x, axis=0))
    edge_x = np.arange(steps_x.shape[1]) % block == block - 1  # between column k*block-1 and k*block
    edge_y = np.arange(steps_y.shape[0]) % block == block - 1
    across = np.concatenate([steps_x[:, edge_x].ravel(), steps_y[edge_y, :].ravel()]).mean()
    inside = np.concatenate([steps_x[:, ~edge_x].ravel(), steps_y[~edge_y, :].ravel()]).mean()
    if inside == 0.0:
        return 1.0 if across == 0.0 else math.inf
    return float(across / inside)
