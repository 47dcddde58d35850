"""Input-use checks: does the model's answer depend on the radiograph it is given?

A model can score well on held-out patients of a family of near-identical volumes by memorising the
family's views and ignoring its input. Two checks, which such a memoriser fails, run on held-out
PA inputs at the same target views as the evaluation:

* **grey**: the model's outputs from the real PA and from a uniform grey image (0.5 everywhere in
  [0, 1]) are each scored against the truth. A model that uses its input loses a lot from the grey
  one; the target is a mean PSNR drop of at least :data:`GREY_TARGET_DB`.
* **flip**: the PA mirrored left-right is the PA of the mirrored patient. Mirroring the patient
  maps azimuth a to -a (the convention of :mod:`synthesis.drr`; ``tests/test_input_checks.py``
  renders a CT and its mirror to confirm it), so for a view (a, e) the mirrored patient's truth is
  ``fliplr(truth at (-a, e))``. The output from the flipped PA passes when its mean SSIM to that
  mirrored truth exceeds its mean SSIM to the model's output from the unflipped PA at (a, e),
  which a model that ignores its input reproduces exactly. The verdict is taken over the views
  with |azimuth| <= :data:`FLIP_MAX_AZIMUTH`: at a lateral the mirrored patient's view is nearly the
  patient's own (the same rays, only the magnification of the near and far side swapped), so the
  right answer to the flipped PA is nearly the unflipped one and the comparison cannot tell a model
  that reads its input from one that does not. Each view's SSIM between its truth and its mirrored
  truth is recorded to show it (on the demo model's held-out patients at elevation 0: 0.42 at 30
  degrees, 0.50 at 60, 0.58 at 75, 0.77 at 90); the near-lateral views' figures are reported apart.

The PA and the grey input are sampled with the same seed (the pipeline derives each view's noise
from the seed and the view's angles, so their outputs of a view share their noise); the flipped PA
with another seed (:data:`FLIP_SEED_OFFSET`), so its output shares no noise with the unflipped one.
With shared noise the sampler's noise-made texture would be common to both outputs whatever the
input, and a model that samples the true distribution of views would fail the check on any patient;
with independent noise it passes where the patient is not left-right symmetric, and a memoriser
still fails (its outputs differ only by noise). Callers pass that second predictor as
``predict_flipped``; a deterministic predictor can serve as both.
Writes ``input_checks.json`` (means and verdicts) and ``input_checks.csv`` (figures per view).
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dicomnode.errors import SynthesisError
from synthesis.drr_dataset import IndexRow, load_index
from synthesis.evaluate import target_groups
from synthesis.metrics import psnr, ssim
from synthesis.training_data import RowFilter, load_drr_image

if TYPE_CHECKING:
    from synthesis.pipeline import SvdrrPipeline

logger = logging.getLogger(__name__)

CHECKS_JSON_NAME = "input_checks.json"
CHECKS_CSV_NAME = "input_checks.csv"
GREY_LEVEL = 0.5  # the uniform input, in [0, 1]
GREY_TARGET_DB = 3.0  # the PSNR the real PA must be worth over the grey input, dB
FLIP_SEED_OFFSET = 1  # the flipped PA is sampled with seed + this: noise independent of the PA's
FLIP_MAX_AZIMUTH = 60.0  # the flip verdict's views, degrees: beyond, mirroring barely changes the view
CHECK_COLUMNS = (
    "case", "augmentation", "azimuth", "elevation", "psnr_pa", "ssim_pa", "psnr_grey", "ssim_grey",
    "ssim_flip_to_mirrored_truth", "ssim_flip_to_unflipped_output",
    "psnr_flip_to_mirrored_truth", "psnr_flip_to_unflipped_output", "ssim_truth_to_mirrored_truth",
)  # fmt: skip

# A predictor maps a (H, W) input in [0, 1] and views (azimuth, elevation) in degrees to (n, H, W).
Predictor = Callable[[np.ndarray, Sequence[tuple[float, float]]], np.ndarray]


def pipeline_predictor(
    pipe: SvdrrPipeline, *, steps: int = 20, guidance: float = 3.0, seed: int = 0, max_batch: int = 8
) -> Predictor:
    """The pipeline as a :data:`Predictor`, with the evaluation's sampler settings and seed."""

    def predict(image: np.ndarray, views: Sequence[tuple[float, float]]) -> np.ndarray:
        output = pipe(
            image,
            azimuths=[a for a, _ in views],
            elevations=[e for _, e in views],
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=seed,
            max_batch=max_batch,
            return_dict=False,
        )
        return np.asarray(output[0], dtype=np.float32)

    return predict


@dataclass(frozen=True)
class ViewCheck:
    """One target view's figures; the flip figures are NaN where the mirrored view is not in the data."""

    case: str
    augmentation: int
    azimuth: float
    elevation: float
    psnr_pa: float
    ssim_pa: float
    psnr_grey: float
    ssim_grey: float
    ssim_flip_to_mirrored_truth: float
    ssim_flip_to_unflipped_output: float
    psnr_flip_to_mirrored_truth: float
    psnr_flip_to_unflipped_output: float
    ssim_truth_to_mirrored_truth: float  # how much mirroring the patient changes this view (1: not at all)

    @property
    def has_mirror(self) -> bool:
        """The data holds the mirrored view (-azimuth, elevation), so the flip figures are measured."""
        return math.isfinite(self.ssim_flip_to_mirrored_truth)

    @property
    def in_flip_verdict(self) -> bool:
        """Has a mirrored truth and is not near-lateral (see :data:`FLIP_MAX_AZIMUTH`)."""
        return self.has_mirror and abs(self.azimuth) <= FLIP_MAX_AZIMUTH + 1e-6


@dataclass(frozen=True)
class GreyCheck:
    """Means over ``n`` views of the model's scores from the real PA and from the grey input."""

    n: int
    psnr_pa: float
    ssim_pa: float
    psnr_grey: float
    ssim_grey: float
    target_db: float = GREY_TARGET_DB

    @property
    def psnr_drop(self) -> float:
        return self.psnr_pa - self.psnr_grey

    @property
    def ssim_drop(self) -> float:
        return self.ssim_pa - self.ssim_grey

    @property
    def passed(self) -> bool:
        return self.psnr_drop >= self.target_db  # False for NaN

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "psnr_drop": self.psnr_drop, "ssim_drop": self.ssim_drop, "passed": self.passed}


@dataclass(frozen=True)
class FlipFigures:
    """Means over ``n`` views of the flipped input's output against the mirrored truth and the unflipped output."""

    n: int
    ssim_to_mirrored_truth: float
    ssim_to_unflipped_output: float
    psnr_to_mirrored_truth: float
    psnr_to_unflipped_output: float
    fraction_closer_to_mirrored_truth: float  # views whose SSIM to the mirrored truth is the higher
    ssim_truth_to_mirrored_truth: float  # how alike the truth and the mirrored truth are

    @classmethod
    def of(cls, views: Sequence[ViewCheck]) -> FlipFigures:
        closer = [float(v.ssim_flip_to_mirrored_truth > v.ssim_flip_to_unflipped_output) for v in views]
        return cls(
            len(views),
            _mean([v.ssim_flip_to_mirrored_truth for v in views]),
            _mean([v.ssim_flip_to_unflipped_output for v in views]),
            _mean([v.psnr_flip_to_mirrored_truth for v in views]),
            _mean([v.psnr_flip_to_unflipped_output for v in views]),
            _mean(closer),
            _mean([v.ssim_truth_to_mirrored_truth for v in views]),
        )


@dataclass(frozen=True)
class FlipCheck(FlipFigures):
    """The verdict's figures (views with |azimuth| <= :data:`FLIP_MAX_AZIMUTH`) and the near-lateral ones apart."""

    near_lateral: FlipFigures | None = None  # the views beyond FLIP_MAX_AZIMUTH: reported, not judged
    max_azimuth: float = FLIP_MAX_AZIMUTH

    @property
    def passed(self) -> bool:
        return self.n > 0 and self.ssim_to_mirrored_truth > self.ssim_to_unflipped_output

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


@dataclass(frozen=True)
class InputChecks:
    """Both checks, the per-view figures and the files written."""

    grey: GreyCheck
    flip: FlipCheck
    views: tuple[ViewCheck, ...]
    json_path: Path
    csv_path: Path

    @property
    def passed(self) -> bool:
        return self.grey.passed and self.flip.passed


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if values else math.nan


def _angle_key(azimuth: float, elevation: float) -> tuple[float, float]:
    return round(azimuth, 6) + 0.0, round(elevation, 6) + 0.0  # + 0.0: -0.0 and 0.0 are one key


def summarise_checks(views: Sequence[ViewCheck], target_db: float = GREY_TARGET_DB) -> tuple[GreyCheck, FlipCheck]:
    """The two checks' means over the views; the flip over those with a mirrored truth, near-lateral apart."""
    grey = GreyCheck(
        len(views),
        _mean([v.psnr_pa for v in views]),
        _mean([v.ssim_pa for v in views]),
        _mean([v.psnr_grey for v in views]),
        _mean([v.ssim_grey for v in views]),
        target_db,
    )
    judged = [v for v in views if v.in_flip_verdict]
    lateral = [v for v in views if v.has_mirror and not v.in_flip_verdict]
    figures = FlipFigures.of(judged)
    flip = FlipCheck(**asdict(figures), near_lateral=FlipFigures.of(lateral) if lateral else None)
    return grey, flip


def _check_group(
    predict: Predictor,
    predict_flipped: Predictor,
    data_dir: Path,
    resolution: int,
    pa_row: IndexRow,
    targets: Sequence[IndexRow],
    by_angle: Mapping[tuple[float, float], IndexRow],
) -> list[ViewCheck]:
    pa = load_drr_image(data_dir / pa_row.path, resolution)
    views = [(row.azimuth, row.elevation) for row in targets]
    outputs = predict(pa, views)
    from_grey = predict(np.full_like(pa, GREY_LEVEL), views)
    from_flipped = predict_flipped(np.ascontiguousarray(np.fliplr(pa)), views)
    if not outputs.shape == from_grey.shape == from_flipped.shape == (len(views), *pa.shape):
        raise SynthesisError(f"a predictor returned {outputs.shape}, expected {(len(views), *pa.shape)}")
    checks = []
    for row, out, grey, flipped in zip(targets, outputs, from_grey, from_flipped, strict=True):
        truth = load_drr_image(data_dir / row.path, resolution)
        mirror_row = by_angle.get(_angle_key(-row.azimuth, row.elevation))
        flip = [math.nan] * 5
        if mirror_row is not None:
            mirrored_truth = np.fliplr(load_drr_image(data_dir / mirror_row.path, resolution))
            flip = [
                ssim(flipped, mirrored_truth),
                ssim(flipped, out),
                psnr(flipped, mirrored_truth),
                psnr(flipped, out),
                ssim(truth, mirrored_truth),
            ]
        checks.append(
            ViewCheck(
                row.case,
                row.augmentation,
                row.azimuth,
                row.elevation,
                psnr(out, truth),
                ssim(out, truth),
                psnr(grey, truth),
                ssim(grey, truth),
                *flip,
            )
        )
    return checks


def _cell(name: str, value: object) -> object:
    """Angles as the index writes them; figures exactly (``repr``, so ``inf`` and ``nan`` survive)."""
    if isinstance(value, float):
        return f"{value:.10g}" if name in ("azimuth", "elevation") else repr(value)
    return value


def run_input_checks(
    predict: Predictor,
    data_dir: str | Path,
    out_dir: str | Path,
    resolution: int,
    include: RowFilter | None = None,
    *,
    target_db: float = GREY_TARGET_DB,
    settings: Mapping[str, Any] | None = None,
    predict_flipped: Predictor | None = None,
) -> InputChecks:
    """Run both checks on the target views ``include`` selects (every PA input that has some).

    Callers restrict ``include`` for cost (e.g. held-out cases, |azimuth| >= 30 at elevation 0). The
    mirrored truth of a selected view is looked up among all views of its (case, augmentation),
    selected or not. ``settings`` (sampler, seed, selection) are recorded in the JSON as given.
    ``predict_flipped`` answers the flipped PA (default ``predict``): for a sampler, the same one with
    another seed (:data:`FLIP_SEED_OFFSET`), see the module's docstring.
    """
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    rows = load_index(data_dir)
    groups = target_groups(rows, include)
    if not groups:
        raise SynthesisError(f"no target views with a PA input selected for the input checks in {data_dir}")
    by_group: dict[tuple[str, int], dict[tuple[float, float], IndexRow]] = {}
    for row in rows:
        if row.view_id != 0:
            by_group.setdefault((row.case, row.augmentation), {})[_angle_key(row.azimuth, row.elevation)] = row
    views: list[ViewCheck] = []
    for number, (pa_row, targets) in enumerate(groups, start=1):
        by_angle = by_group[(pa_row.case, pa_row.augmentation)]
        views += _check_group(predict, predict_flipped or predict, data_dir, resolution, pa_row, targets, by_angle)
        logger.info(
            "input checks: %s augmentation %d (%d of %d)", pa_row.case, pa_row.augmentation, number, len(groups)
        )
    grey, flip = summarise_checks(views, target_db)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out_dir / CHECKS_JSON_NAME, out_dir / CHECKS_CSV_NAME
    report = {
        "settings": dict(settings or {}),
        "inputs": len(groups),
        "grey": {"level": GREY_LEVEL, **grey.to_dict()},
        "flip": flip.to_dict(),
        "passed": grey.passed and flip.passed,
    }
    json_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    with open(csv_path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(CHECK_COLUMNS)
        for v in views:
            writer.writerow([_cell(name, value) for name, value in asdict(v).items()])
    logger.info("input checks written to %s", out_dir)
    return InputChecks(grey, flip, tuple(views), json_path, csv_path)


def read_checks(path: Path) -> list[ViewCheck]:
    """The per-view figures of an ``input_checks.csv``."""
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if tuple(reader.fieldnames or ()) != CHECK_COLUMNS:
            raise SynthesisError(f"{path} header is {reader.fieldnames!r}, expected {list(CHECK_COLUMNS)}")
        return [ViewCheck(r["case"], int(r["augmentation"]), *(float(r[k]) for k in CHECK_COLUMNS[2:])) for r in reader]


def format_checks(checks: InputChecks) -> str:
    """A short table of both checks with their verdicts."""
    g, f = checks.grey, checks.flip
    verdict = {True: "PASS", False: "FAIL"}
    return "\n".join(
        [
            f"input checks ({g.n} views)",
            f"  grey input: model PSNR {g.psnr_pa:.2f} dB / SSIM {g.ssim_pa:.3f} from the PA, "
            f"{g.psnr_grey:.2f} dB / {g.ssim_grey:.3f} from grey; drop {g.psnr_drop:.2f} dB "
            f"(target >= {g.target_db:g})  {verdict[g.passed]}",
            f"  flipped PA ({f.n} views, |azimuth| <= {f.max_azimuth:g}): SSIM {f.ssim_to_mirrored_truth:.3f} to "
            f"the mirrored truth, {f.ssim_to_unflipped_output:.3f} to the unflipped output; closer to the mirror "
            f"in {f.fraction_closer_to_mirrored_truth:.0%} of views  {verdict[f.passed]}",
            *([] if f.near_lateral is None else [_near_lateral_line(f.near_lateral, f.ssim_truth_to_mirrored_truth)]),
        ]
    )


def _near_lateral_line(lateral: FlipFigures, judged_mirror_ssim: float) -> str:
    return (
        f"    not judged, near-lateral ({lateral.n} views): SSIM {lateral.ssim_to_mirrored_truth:.3f} to the "
        f"mirrored truth, {lateral.ssim_to_unflipped_output:.3f} to the unflipped output; truth to mirrored "
        f"truth {lateral.ssim_truth_to_mirrored_truth:.3f} there, {judged_mirror_ssim:.3f} at the judged views"
    )
