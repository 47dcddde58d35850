"""Evaluating synthesised views against ground-truth DRRs, beside two baselines that need no model.

For every (case, augmentation) of a DRR dataset folder (:mod:`synthesis.drr_dataset`), view 0, the
PA view, is the input; the selected target views are the ground truth. Each method's prediction of
each target is scored with PSNR and SSIM (:mod:`synthesis.metrics`), as the method is evaluated in
svdrr-spec.md ("Views and data"). Input and targets are loaded with
:func:`synthesis.training_data.load_drr_image`, resized to the model's resolution and min-max
normalised on their own, exactly as the model sees them in training.

Methods:

* ``model``: the SV-DRR pipeline, all targets of one input in one call (only when a model is given).
* ``identity``: the PA input itself. What a model that ignores the pose would score; any model
  worth its compute must beat it away from 0 degrees.
* ``foreshortened``: the PA input squeezed horizontally about the image centre by |cos(azimuth)|,
  the first-order geometry of turning a flat object about the vertical axis (content width times
  cos). It knows the angle but nothing of anatomy, depth or overlap: the floor for pose use.

Writes ``metrics.csv`` (one row per method and target view), ``summary.csv`` (means per method per
azimuth, overall, and over |azimuth| >= 30) and ``metrics.png`` (PSNR and SSIM against azimuth);
with a model also ``grid.json``: how strongly its patch grid shows in its views against the truth's
(:func:`synthesis.metrics.patch_grid_ratio`, means over the views).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from dicomnode.errors import SynthesisError
from synthesis.aligned import MIN_SCALE, squeeze_matrices
from synthesis.drr_dataset import IndexRow, load_index
from synthesis.metrics import patch_grid_ratio, psnr, ssim
from synthesis.training_data import RowFilter, load_drr_image

if TYPE_CHECKING:  # torch and diffusers load with the model, not with this module
    from synthesis.pipeline import SvdrrPipeline

logger = logging.getLogger(__name__)

METRICS_NAME = "metrics.csv"
SUMMARY_NAME = "summary.csv"
PLOT_NAME = "metrics.png"
GRID_NAME = "grid.json"
METRICS_COLUMNS = ("method", "case", "augmentation", "azimuth", "elevation", "psnr", "ssim")
SUMMARY_COLUMNS = ("method", "azimuth", "n", "psnr", "ssim")
WIDE_AZIMUTH = 30.0  # degrees: "wide" views, where the PA input alone is a poor answer
ALL, WIDE = "all", f"abs>={WIDE_AZIMUTH:g}"  # the aggregate rows' azimuth labels in summary.csv


# --- baselines -------------------------------------------------------------------------------------


def identity(pa: np.ndarray, azimuth: float, elevation: float = 0.0) -> np.ndarray:
    """The PA input as the prediction of every view (a copy, float32)."""
    return np.array(pa, dtype=np.float32, copy=True)


def foreshortened(pa: np.ndarray, azimuth: float, elevation: float = 0.0, min_scale: float = MIN_SCALE) -> np.ndarray:
    """The PA input squeezed horizontally about the image centre by s = max(|cos(azimuth)|, min_scale).

    Output column x takes the mean of the input over the interval that maps onto it, centre
    c + (x - c) / s and width 1 / s (an exact box filter of the piecewise-constant input, so the
    squeeze does not alias; :func:`synthesis.aligned.squeeze_matrices`, the squeeze that aligned
    models get as a condition); beyond the input's edges the background is 0. Squeezing averages
    columns together, while every DRR is min-max normalised on its own, so the result is scaled
    back to the input's peak. At azimuth 0 it returns the input. ``elevation`` is ignored.
    """
    image = np.asarray(pa, dtype=np.float64)
    if image.ndim != 2:
        raise SynthesisError(f"the PA image must be 2-D, got shape {image.shape}")
    if not 0 < min_scale <= 1:
        raise SynthesisError(f"min_scale must lie in (0, 1], got {min_scale!r}")
    scale = max(abs(math.cos(math.radians(azimuth))), min_scale)
    matrix = squeeze_matrices(torch.tensor([scale]), image.shape[1], min_scale)[0].numpy()
    squeezed = image @ matrix.T
    peak, squeezed_peak = float(image.max(initial=0.0)), float(squeezed.max(initial=0.0))
    if squeezed_peak > 0:
        squeezed *= peak / squeezed_peak
    return squeezed.astype(np.float32)


Baseline = Callable[[np.ndarray, float, float], np.ndarray]
BASELINES: dict[str, Baseline] = {"identity": identity, "foreshortened": foreshortened}


# --- results ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Score:
    """One method's PSNR (dB) and SSIM for one target view."""

    method: str
    case: str
    augmentation: int
    azimuth: float
    elevation: float
    psnr: float
    ssim: float


@dataclass(frozen=True)
class MeanScore:
    """Means over ``n`` scores (NaN when n is 0); a mean including an infinite PSNR is infinite."""

    n: int
    psnr: float
    ssim: float

    @classmethod
    def of(cls, scores: Sequence[Score]) -> MeanScore:
        if not scores:
            return cls(0, math.nan, math.nan)
        return cls(len(scores), float(np.mean([s.psnr for s in scores])), float(np.mean([s.ssim for s in scores])))


@dataclass(frozen=True)
class MethodSummary:
    """One method: means over all target views, over |azimuth| >= 30, and per azimuth (sorted)."""

    method: str
    overall: MeanScore
    wide: MeanScore
    per_azimuth: tuple[tuple[float, MeanScore], ...]


@dataclass(frozen=True)
class EvaluationResult:
    """What :func:`evaluate` measured and where it wrote it; ``summaries`` keyed by method."""

    summaries: dict[str, MethodSummary]
    scores: tuple[Score, ...]
    resolution: int
    metrics_csv: Path
    summary_csv: Path
    plot: Path
    # With a model: {"block": patch in pixels, "views": n, "model": mean ratio, "truth": mean ratio}.
    grid: dict[str, float] | None = None

    def __post_init__(self) -> None:
        if not self.summaries:
            raise SynthesisError("an evaluation result needs at least one method")


def summarise(scores: Sequence[Score]) -> dict[str, MethodSummary]:
    """Means per method (in first-seen order): overall, |azimuth| >= 30 and per azimuth."""
    methods = list(dict.fromkeys(s.method for s in scores))
    summaries = {}
    for method in methods:
        mine = [s for s in scores if s.method == method]
        azimuths = sorted({s.azimuth for s in mine})
        summaries[method] = MethodSummary(
            method,
            MeanScore.of(mine),
            MeanScore.of([s for s in mine if abs(s.azimuth) >= WIDE_AZIMUTH]),
            tuple((a, MeanScore.of([s for s in mine if s.azimuth == a])) for a in azimuths),
        )
    return summaries


# --- the run ---------------------------------------------------------------------------------------


def target_groups(rows: Sequence[IndexRow], include: RowFilter | None) -> list[tuple[IndexRow, list[IndexRow]]]:
    """(PA row, selected target rows) per (case, augmentation) in index order; empty groups dropped."""
    pa = {(r.case, r.augmentation): r for r in rows if r.view_id == 0}
    targets: dict[tuple[str, int], list[IndexRow]] = {}
    for row in rows:
        if row.view_id != 0 and (include is None or include(row)):
            targets.setdefault((row.case, row.augmentation), []).append(row)
    orphans = [key for key in targets if key not in pa]
    if orphans:
        logger.warning("%d (case, augmentation) groups have no PA view; skipped", len(orphans))
    return [(pa[key], group) for key, group in targets.items() if key in pa]


def load_model(model_dir: str | Path, device: str = "cpu") -> SvdrrPipeline:
    """The pipeline in ``model_dir`` on ``device`` (auto, cpu, cuda, cuda:N)."""
    from synthesis.device import resolve_device
    from synthesis.pipeline import SvdrrPipeline

    return SvdrrPipeline.from_pretrained(model_dir, device=resolve_device(device))


def evaluate(
    model_dir: str | Path | SvdrrPipeline | None,
    data_dir: str | Path,
    out_dir: str | Path,
    include: RowFilter | None = None,
    *,
    resolution: int | None = None,
    steps: int = 20,
    guidance: float = 3.0,
    seed: int = 0,
    max_batch: int = 8,
    device: str = "cpu",
) -> EvaluationResult:
    """Score the model (when ``model_dir`` is given) and the baselines on the selected target views.

    ``model_dir`` is a model folder or a pipeline already loaded (:func:`load_model`).
    ``include`` selects target rows (e.g. azimuths, held-out augmentations or cases). Images are
    compared at the model's resolution; without a model ``resolution`` is required. Each input's
    targets are synthesised in one pipeline call seeded with ``seed`` (each view's noise derives from
    the seed and its own angles, so a view's output does not depend on the others selected).
    """
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    groups = target_groups(load_index(data_dir), include)
    if not groups:
        raise SynthesisError(f"no target views with a PA input selected in {data_dir}")
    pipe = None
    if model_dir is not None:
        pipe = load_model(model_dir, device) if isinstance(model_dir, (str, Path)) else model_dir
        if resolution is not None and resolution != pipe.resolution:
            raise SynthesisError(f"resolution {resolution} differs from the model's {pipe.resolution}")
        resolution = pipe.resolution
    if resolution is None or resolution < 1:
        raise SynthesisError(f"without a model, give a resolution >= 1 (got {resolution!r})")

    scores: list[Score] = []
    block = pipe.size_multiple if pipe is not None and resolution >= 2 * pipe.size_multiple else 1
    grid_ratios: dict[str, list[float]] = {"model": [], "truth": []}
    for number, (pa_row, targets) in enumerate(groups, start=1):
        started = time.perf_counter()
        pa = load_drr_image(data_dir / pa_row.path, resolution)
        truths = [load_drr_image(data_dir / row.path, resolution) for row in targets]
        predictions: dict[str, list[np.ndarray]] = {}
        if pipe is not None:
            output = pipe(
                pa,
                azimuths=[row.azimuth for row in targets],
                elevations=[row.elevation for row in targets],
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=seed,
                max_batch=max_batch,
            )
            images = output[0] if isinstance(output, tuple) else output.images
            predictions["model"] = list(np.asarray(images, dtype=np.float32))
            if block >= 2:
                grid_ratios["model"] += [patch_grid_ratio(image, block) for image in predictions["model"]]
                grid_ratios["truth"] += [patch_grid_ratio(truth, block) for truth in truths]
        for name, baseline in BASELINES.items():
            predictions[name] = [baseline(pa, row.azimuth, row.elevation) for row in targets]
        for method, images in predictions.items():
            for row, image, truth in zip(targets, images, truths, strict=True):
                scores.append(
                    Score(
                        method,
                        row.case,
                        row.augmentation,
                        row.azimuth,
                        row.elevation,
                        psnr(image, truth),
                        ssim(image, truth),
                    )
                )
        logger.info(
            "evaluated %s augmentation %d: %d views in %.1f s (%d of %d)",
            pa_row.case,
            pa_row.augmentation,
            len(targets),
            time.perf_counter() - started,
            number,
            len(groups),
        )

    out_dir.mkdir(parents=True, exist_ok=True)
    summaries = summarise(scores)
    grid: dict[str, float] | None = None
    if grid_ratios["model"]:
        grid = {"block": block, "views": len(grid_ratios["model"])}
        grid |= {name: float(np.mean(values)) for name, values in grid_ratios.items()}
        (out_dir / GRID_NAME).write_text(json.dumps(grid, indent=2) + "\n", encoding="utf-8")
    result = EvaluationResult(
        summaries,
        tuple(scores),
        resolution,
        write_metrics(scores, out_dir / METRICS_NAME),
        write_summary(summaries, out_dir / SUMMARY_NAME),
        plot_metrics(summaries, out_dir / PLOT_NAME),
        grid,
    )
    logger.info("evaluation written to %s", out_dir)
    return result


# --- reports ---------------------------------------------------------------------------------------


def write_metrics(scores: Sequence[Score], path: Path) -> Path:
    """One row per method and target view; an identical prediction's PSNR is written ``inf``."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(METRICS_COLUMNS)
        for s in scores:
            writer.writerow(
                [
                    s.method,
                    s.case,
                    s.augmentation,
                    f"{s.azimuth:.10g}",
                    f"{s.elevation:.10g}",
                    repr(s.psnr),
                    repr(s.ssim),
                ]
            )
    return path


def read_metrics(path: Path) -> list[Score]:
    """The scores of a ``metrics.csv`` written by :func:`write_metrics`."""
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if tuple(reader.fieldnames or ()) != METRICS_COLUMNS:
            raise SynthesisError(f"{path} header is {reader.fieldnames!r}, expected {list(METRICS_COLUMNS)}")
        return [
            Score(
                r["method"],
                r["case"],
                int(r["augmentation"]),
                float(r["azimuth"]),
                float(r["elevation"]),
                float(r["psnr"]),
                float(r["ssim"]),
            )
            for r in reader
        ]


def write_summary(summaries: dict[str, MethodSummary], path: Path) -> Path:
    """Per method: a row per azimuth, then ``all`` and ``abs>=30`` rows (n, mean PSNR, mean SSIM)."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(SUMMARY_COLUMNS)
        for method, summary in summaries.items():
            labelled = [(f"{a:.10g}", m) for a, m in summary.per_azimuth] + [
                (ALL, summary.overall),
                (WIDE, summary.wide),
            ]
            for label, mean in labelled:
                writer.writerow([method, label, mean.n, repr(mean.psnr), repr(mean.ssim)])
    return path


def format_table(summaries: dict[str, MethodSummary]) -> str:
    """A fixed-width table: one line per azimuth and the two aggregates, PSNR and SSIM per method."""
    methods = list(summaries)
    azimuths = sorted({a for s in summaries.values() for a, _ in s.per_azimuth})
    header = f"{'azimuth':>9}" + "".join(f" {m[:13] + ' PSNR':>18} {'SSIM':>6}" for m in methods)
    lines = [header, "-" * len(header)]

    def line(label: str, means: list[MeanScore | None]) -> str:
        cells = "".join(f" {m.psnr:18.2f} {m.ssim:6.3f}" if m else f" {'-':>18} {'-':>6}" for m in means)
        return f"{label:>9}" + cells

    for a in azimuths:
        lines.append(line(f"{a:g}", [dict(summaries[m].per_azimuth).get(a) for m in methods]))
    lines.append("-" * len(header))
    lines.append(line(ALL, [summaries[m].overall for m in methods]))
    lines.append(line(WIDE, [summaries[m].wide for m in methods]))
    return "\n".join(lines)


def plot_metrics(summaries: dict[str, MethodSummary], path: Path) -> Path:
    """PSNR and SSIM against azimuth, one line per method (infinite PSNRs are not drawn)."""
    from matplotlib.figure import Figure  # the Agg canvas, without pyplot's global state

    figure = Figure(figsize=(10, 4), layout="constrained")
    psnr_axes, ssim_axes = figure.subplots(1, 2)
    for method, summary in summaries.items():
        azimuths = [a for a, _ in summary.per_azimuth]
        psnrs = [m.psnr if math.isfinite(m.psnr) else math.nan for _, m in summary.per_azimuth]
        psnr_axes.plot(azimuths, psnrs, marker="o", markersize=3, label=method)
        ssim_axes.plot(azimuths, [m.ssim for _, m in summary.per_azimuth], marker="o", markersize=3, label=method)
    for axes, name in ((psnr_axes, "PSNR (dB)"), (ssim_axes, "SSIM")):
        axes.set_xlabel("target azimuth (degrees, 0 = PA input)")
        axes.set_ylabel(name)
        axes.grid(True, alpha=0.3)
        axes.legend()
    figure.suptitle("synthesised views against ground-truth DRRs (mean per azimuth)")
    figure.savefig(path, dpi=100)
    return path


def format_grid(grid: dict[str, float] | None) -> str:
    """One line on the patch grid of the model's views, or nothing without a model."""
    if not grid:
        return ""
    return (
        f"patch grid ({int(grid['block'])} px, {int(grid['views'])} views): step across patch edges / "
        f"inside patches {grid['model']:.3f} in the model's views, {grid['truth']:.3f} in the truth (1 = no grid)"
    )
