"""The model card's evaluation in one call: scores, selection tables, angle plots, input checks, targets.

:func:`run_evaluation` scores the model and the baselines (:func:`synthesis.evaluate.evaluate`),
summarises them by view selection and plots them against azimuth and elevation
(:mod:`synthesis.eval_report`), optionally runs the input-use checks (:mod:`synthesis.input_checks`)
with the same loaded model and sampler settings, and judges the targets:

* the model beats the identity baseline on PSNR and on SSIM over |azimuth| >= 30 at elevation 0,
  and at azimuth +-45 at each non-zero elevation present (e.g. -30, -15, +15, +30);
* the grey input costs the model at least 3 dB PSNR; the flipped PA is answered by the mirrored view
  (judged at |azimuth| <= 60: see :data:`synthesis.input_checks.FLIP_MAX_AZIMUTH`).

Writes, besides the evaluation's files, ``selections.csv``, ``angles.png``, ``targets.json`` and,
with the checks, ``input_checks.json`` and ``input_checks.csv``. ``dicomnode evaluate`` and
``benchmarks/demo_model.py`` both run through here, so their numbers cannot drift apart.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicomnode.errors import SynthesisError
from synthesis.eval_report import (
    ANGLES_PLOT_NAME,
    SELECTIONS_NAME,
    WIDE_EL0,
    Selection,
    SelectionSummary,
    plot_angles,
    summarise_selections,
    write_selections,
)
from synthesis.evaluate import EvaluationResult, evaluate, load_model
from synthesis.input_checks import FLIP_SEED_OFFSET, InputChecks, pipeline_predictor, run_input_checks
from synthesis.training_data import RowFilter

if TYPE_CHECKING:
    from synthesis.drr_dataset import IndexRow
    from synthesis.pipeline import SvdrrPipeline

TARGETS_NAME = "targets.json"
REFERENCE = "identity"  # the baseline the model must beat
DEFAULT_CHECK_SELECTION = WIDE_EL0


@dataclass(frozen=True)
class Target:
    """One target: ``value`` against ``reference`` (a baseline's score, or a threshold)."""

    name: str
    value: float
    reference: float
    passed: bool


@dataclass(frozen=True)
class Report:
    """Everything :func:`run_evaluation` measured and wrote."""

    evaluation: EvaluationResult
    selections: SelectionSummary
    selections_csv: Path
    angles_plot: Path
    checks: InputChecks | None
    targets: tuple[Target, ...]
    targets_json: Path

    @property
    def passed(self) -> bool:
        """Every target met (False when there is none, e.g. without a model)."""
        return bool(self.targets) and all(t.passed for t in self.targets)


def judge(selections: SelectionSummary, checks: InputChecks | None = None) -> list[Target]:
    """The targets that the scores allow: selections without model scores or views are skipped."""
    names = [WIDE_EL0.name, *(n for n in selections if n.startswith("az45-el"))]
    targets = []
    for name in names:
        per = selections.get(name, {})
        if "model" not in per or REFERENCE not in per or per["model"].n == 0:
            continue
        model, reference = per["model"], per[REFERENCE]
        for metric in ("psnr", "ssim"):
            value, ref = getattr(model, metric), getattr(reference, metric)
            targets.append(Target(f"{name} {metric.upper()}: model > {REFERENCE}", value, ref, value > ref))
    if checks is not None:
        g, f = checks.grey, checks.flip
        targets.append(Target(f"grey input costs >= {g.target_db:g} dB PSNR", g.psnr_drop, g.target_db, g.passed))
        targets.append(
            Target(
                f"flipped PA (abs azimuth <= {f.max_azimuth:g}): SSIM to mirrored truth > to unflipped output",
                f.ssim_to_mirrored_truth,
                f.ssim_to_unflipped_output,
                f.passed,
            )
        )
    return targets


def format_targets(targets: list[Target] | tuple[Target, ...]) -> str:
    """One line per target: verdict, name, value against reference."""
    if not targets:
        return "targets: none to judge (no model scores)"
    return "\n".join(
        f"{'PASS' if t.passed else 'FAIL'}  {t.name:<58} {t.value:8.3f} vs {t.reference:8.3f}" for t in targets
    )


def run_evaluation(
    model: str | Path | SvdrrPipeline | None,
    data_dir: str | Path,
    out_dir: str | Path,
    include: RowFilter | None = None,
    *,
    input_checks: Selection | None = None,
    resolution: int | None = None,
    steps: int = 20,
    guidance: float = 3.0,
    seed: int = 0,
    max_batch: int = 8,
    device: str = "cpu",
) -> Report:
    """Evaluate ``include``'s target views; with ``input_checks``, run the checks on its views within them.

    The model loads once and serves both the evaluation and the checks; the checks use the same
    steps, guidance, seed and batch. ``input_checks`` needs a model.
    """
    out_dir = Path(out_dir)
    if input_checks is not None and model is None:
        raise SynthesisError("the input checks need a model")
    pipe = load_model(model, device) if isinstance(model, (str, Path)) else model
    result = evaluate(
        pipe, data_dir, out_dir, include,
        resolution=resolution, steps=steps, guidance=guidance, seed=seed, max_batch=max_batch, device=device,
    )  # fmt: skip
    selections = summarise_selections(result.scores)
    selections_csv = write_selections(selections, out_dir / SELECTIONS_NAME)
    angles_plot = plot_angles(result.scores, out_dir / ANGLES_PLOT_NAME)
    checks = None
    if input_checks is not None and pipe is not None:
        chosen = input_checks

        def check_views(row: IndexRow) -> bool:
            return chosen.include(row) and (include is None or include(row))

        settings: dict[str, Any] = {
            "selection": chosen.name,
            "selection_description": chosen.description,
            "steps": steps,
            "guidance": guidance,
            "seed": seed,
            "max_batch": max_batch,
            "model_identity": pipe.model_identity,
            "resolution": result.resolution,
        }
        predict = pipeline_predictor(pipe, steps=steps, guidance=guidance, seed=seed, max_batch=max_batch)
        flip_seed = seed + FLIP_SEED_OFFSET
        settings["flip_seed"] = flip_seed
        flipped = pipeline_predictor(pipe, steps=steps, guidance=guidance, seed=flip_seed, max_batch=max_batch)
        checks = run_input_checks(
            predict, data_dir, out_dir, result.resolution, check_views, settings=settings, predict_flipped=flipped
        )
    targets = tuple(judge(selections, checks))
    targets_json = out_dir / TARGETS_NAME
    document = {"passed": bool(targets) and all(t.passed for t in targets), "targets": [asdict(t) for t in targets]}
    targets_json.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return Report(result, selections, selections_csv, angles_plot, checks, targets, targets_json)
