"""Summaries by view selection and metric-against-angle plots, from :func:`synthesis.evaluate.evaluate`'s scores.

The model card reports a model where the PA input alone is a poor answer: away from the input in
azimuth (|azimuth| >= 30 at elevation 0) and tilted out of the transverse plane (non-zero elevations
at azimuth +-45, in all and per elevation value). A selection is a named predicate on a view's
``azimuth`` and ``elevation``, so it applies alike to :class:`~synthesis.evaluate.Score` and to
dataset index rows.

Writes ``selections.csv`` (mean PSNR and SSIM per selection and method) and ``angles.png`` (PSNR and
SSIM against azimuth at elevation 0, and against elevation at azimuth +-45, one line per method).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from dicomnode.errors import SynthesisError
from synthesis.evaluate import WIDE_AZIMUTH, MeanScore, Score

SELECTIONS_NAME = "selections.csv"
ANGLES_PLOT_NAME = "angles.png"
SELECTION_COLUMNS = ("selection", "method", "n", "psnr", "ssim")
TILT_AZIMUTH = 45.0  # degrees: elevations are reported at azimuth +-45
ANGLE_TOLERANCE = 1e-6  # degrees: index angles are written with 10 significant digits


class Angled(Protocol):
    """Anything with a view's angles in degrees: a Score, an IndexRow."""

    @property
    def azimuth(self) -> float: ...

    @property
    def elevation(self) -> float: ...


def _near(a: float, b: float) -> bool:
    return abs(a - b) <= ANGLE_TOLERANCE


def every_view(view: Angled) -> bool:
    return True


def wide_at_zero_elevation(view: Angled) -> bool:
    """|azimuth| >= 30 at elevation 0: turned away from the PA input in the transverse plane."""
    return abs(view.azimuth) >= WIDE_AZIMUTH - ANGLE_TOLERANCE and _near(view.elevation, 0.0)


def tilted_at_45(view: Angled) -> bool:
    """A non-zero elevation at azimuth +-45."""
    return _near(abs(view.azimuth), TILT_AZIMUTH) and not _near(view.elevation, 0.0)


def at_45_elevation(elevation: float) -> Callable[[Angled], bool]:
    """Azimuth +-45 at the one ``elevation``."""

    def include(view: Angled) -> bool:
        return _near(abs(view.azimuth), TILT_AZIMUTH) and _near(view.elevation, elevation)

    return include


@dataclass(frozen=True)
class Selection:
    """A named set of target views."""

    name: str
    description: str
    include: Callable[[Angled], bool]


ALL = Selection("all", "every target view", every_view)
WIDE_EL0 = Selection("wide-el0", f"|azimuth| >= {WIDE_AZIMUTH:g} at elevation 0", wide_at_zero_elevation)
TILTED = Selection("az45-tilted", f"azimuth +-{TILT_AZIMUTH:g} at every non-zero elevation", tilted_at_45)
STATIC_SELECTIONS = {s.name: s for s in (ALL, WIDE_EL0, TILTED)}


def elevation_selection(elevation: float) -> Selection:
    """``az45-el+15`` and so on: azimuth +-45 at one elevation."""
    return Selection(
        f"az45-el{elevation:+g}", f"azimuth +-{TILT_AZIMUTH:g} at elevation {elevation:+g}", at_45_elevation(elevation)
    )


def selections_for(views: Sequence[Angled]) -> list[Selection]:
    """The static selections, then one per non-zero elevation that occurs at azimuth +-45, ascending."""
    elevations = sorted({round(v.elevation, 6) for v in views if tilted_at_45(v)})
    return [*STATIC_SELECTIONS.values(), *(elevation_selection(e) for e in elevations)]


SelectionSummary = dict[str, dict[str, MeanScore]]  # selection name -> method -> means


def summarise_selections(scores: Sequence[Score], selections: Sequence[Selection] | None = None) -> SelectionSummary:
    """Means per selection and method (methods in first-seen order); n is 0 where nothing matched."""
    selections = selections_for(scores) if selections is None else selections
    methods = list(dict.fromkeys(s.method for s in scores))
    return {
        sel.name: {m: MeanScore.of([s for s in scores if s.method == m and sel.include(s)]) for m in methods}
        for sel in selections
    }


def write_selections(summary: SelectionSummary, path: Path) -> Path:
    """One row per selection and method: n, mean PSNR (dB), mean SSIM."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(SELECTION_COLUMNS)
        for name, methods in summary.items():
            for method, mean in methods.items():
                writer.writerow([name, method, mean.n, repr(mean.psnr), repr(mean.ssim)])
    return path


def read_selections(path: Path) -> SelectionSummary:
    """A ``selections.csv`` written by :func:`write_selections`."""
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if tuple(reader.fieldnames or ()) != SELECTION_COLUMNS:
            raise SynthesisError(f"{path} header is {reader.fieldnames!r}, expected {list(SELECTION_COLUMNS)}")
        summary: SelectionSummary = {}
        for r in reader:
            summary.setdefault(r["selection"], {})[r["method"]] = MeanScore(
                int(r["n"]), float(r["psnr"]), float(r["ssim"])
            )
    return summary


def format_selections(summary: SelectionSummary) -> str:
    """A fixed-width table: one line per selection, n and PSNR / SSIM per method."""
    methods = list(dict.fromkeys(m for per in summary.values() for m in per))
    header = f"{'selection':>12} {'n':>5}" + "".join(f" {m[:13] + ' PSNR':>18} {'SSIM':>6}" for m in methods)
    lines = [header, "-" * len(header)]
    for name, per in summary.items():
        n = max((mean.n for mean in per.values()), default=0)
        cells = "".join(
            f" {per[m].psnr:18.2f} {per[m].ssim:6.3f}" if m in per and per[m].n else f" {'-':>18} {'-':>6}"
            for m in methods
        )
        lines.append(f"{name:>12} {n:5d}" + cells)
    return "\n".join(lines)


# --- plots -----------------------------------------------------------------------------------------


def curve(
    scores: Sequence[Score], method: str, include: Callable[[Score], bool], key: str
) -> list[tuple[float, MeanScore]]:
    """Means of one method's selected scores per value of ``key`` ("azimuth" or "elevation"), sorted."""
    mine = [s for s in scores if s.method == method and include(s)]
    values = sorted({round(float(getattr(s, key)), 6) for s in mine})
    return [(v, MeanScore.of([s for s in mine if _near(getattr(s, key), v)])) for v in values]


def _at_45(score: Score) -> bool:
    return _near(abs(score.azimuth), TILT_AZIMUTH)


def _at_zero_elevation(score: Score) -> bool:
    return _near(score.elevation, 0.0)


def plot_angles(scores: Sequence[Score], path: Path) -> Path:
    """PSNR and SSIM against azimuth (elevation 0) and against elevation (azimuth +-45, pooled)."""
    from matplotlib.figure import Figure  # the Agg canvas, without pyplot's global state

    figure = Figure(figsize=(10, 8), layout="constrained")
    axes = figure.subplots(2, 2)
    methods = list(dict.fromkeys(s.method for s in scores))
    rows = (
        ("azimuth", _at_zero_elevation, "target azimuth (degrees, elevation 0)"),
        ("elevation", _at_45, f"target elevation (degrees, azimuth +-{TILT_AZIMUTH:g})"),
    )
    for (key, include, label), (psnr_axes, ssim_axes) in zip(rows, axes, strict=True):
        drawn = False
        for method in methods:
            points = curve(scores, method, include, key)
            if not points:
                continue
            drawn = True
            x = [v for v, _ in points]
            psnr_axes.plot(
                x,
                [m.psnr if math.isfinite(m.psnr) else math.nan for _, m in points],
                marker="o",
                markersize=3,
                label=method,
            )
            ssim_axes.plot(x, [m.ssim for _, m in points], marker="o", markersize=3, label=method)
        for ax, name in ((psnr_axes, "PSNR (dB)"), (ssim_axes, "SSIM")):
            ax.set_xlabel(label)
            ax.set_ylabel(name)
            ax.grid(True, alpha=0.3)
            if drawn:
                ax.legend()
            else:
                ax.text(0.5, 0.5, "no such views", ha="center", va="center", transform=ax.transAxes)
    figure.suptitle("synthesised views against ground-truth DRRs (mean per angle)")
    figure.savefig(path, dpi=100)
    return path
