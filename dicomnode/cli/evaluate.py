"""``dicomnode evaluate``: PSNR and SSIM of synthesised views against a DRR dataset's ground truth.

Scores the model (``--model``) and two baselines that need none (the PA input itself, and the PA
input foreshortened by |cos(azimuth)|) on the selected target views; writes ``OUT/metrics.csv``,
``OUT/summary.csv``, ``OUT/metrics.png``, the selection table ``OUT/selections.csv``, the angle plots
``OUT/angles.png`` and the verdicts ``OUT/targets.json``, and prints the tables. ``--input-checks``
adds the input-use checks (grey input, flipped PA; :mod:`synthesis.input_checks`). torch loads only
when the command runs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from dicomnode.cli.common import accept_negative_lists, degrees, sampler_origin
from dicomnode.cli.exitcodes import ExitCode
from dicomnode.errors import ModelLoadError
from synthesis.model_meta import DEFAULT_META, ModelMetaError, load_model_meta

if TYPE_CHECKING:  # synthesis imports torch; only the command's run does
    from synthesis.drr_dataset import IndexRow

ANGLE_TOLERANCE = 1e-6  # degrees: index angles are written with 10 significant digits
CHECK_SELECTIONS = ("wide-el0", "az45-tilted", "all")  # synthesis.eval_report.STATIC_SELECTIONS, first the default


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="score synthesised views (and baselines) against a DRR dataset with PSNR and SSIM",
        description="For each (case, augmentation) of a DRR dataset, take the PA view as input and score "
        "the model and the identity and foreshortened baselines against the selected target views. "
        "Writes OUT/metrics.csv, OUT/summary.csv, OUT/metrics.png, OUT/selections.csv, OUT/angles.png and "
        "OUT/targets.json; with --input-checks also OUT/input_checks.json and OUT/input_checks.csv.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", type=Path, required=True, metavar="DIR", help="DRR dataset folder (index.csv)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="results folder (created)")
    p.add_argument("--model", type=Path, default=None, metavar="DIR", help="model folder (default: baselines only)")
    p.add_argument(
        "--resolution", type=int, default=None, metavar="N", help="image side without a model (default the model's)"
    )
    views = p.add_mutually_exclusive_group()
    views.add_argument(
        "--azimuths", type=degrees, default=None, metavar="DEG,...", help="target azimuths (default all)"
    )
    views.add_argument("--simple", action="store_true", help="the simple set: azimuth -90..+90 in 5 degree steps")
    p.add_argument(
        "--elevations", type=degrees, default=None, metavar="DEG,...", help="target elevations (default all)"
    )
    p.add_argument(
        "--augmentations", type=_ints, default=None, metavar="N,...", help="augmentations to score (default all)"
    )
    p.add_argument("--cases", default=None, metavar="CASE,...", help="cases to score (default all)")
    # Unset (None): the model's recommended values from its dicomnode-model.json, as `synthesize` uses them.
    recommended = " (default: the model's recommended, from its dicomnode-model.json)"
    p.add_argument("--steps", type=int, default=None, help="DPM-Solver++ steps" + recommended)
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale, 1 = off" + recommended)
    p.add_argument("--seed", type=int, default=0, help="request seed; each view's noise derives from it")
    p.add_argument("--max-batch", type=int, default=8, help="views denoised together")
    p.add_argument("--device", default="cpu", help="auto, cpu, cuda or cuda:N")
    p.add_argument(
        "--input-checks",
        nargs="?",
        const=CHECK_SELECTIONS[0],
        default=None,
        choices=CHECK_SELECTIONS,
        metavar="VIEWS",
        help="also run the input-use checks (grey input, flipped PA; needs --model) on these of the selected "
        f"views: {', '.join(CHECK_SELECTIONS)} (bare flag: {CHECK_SELECTIONS[0]}, |azimuth| >= 30 at elevation 0)",
    )
    accept_negative_lists(p)
    p.set_defaults(func=run)


def _selection(args: argparse.Namespace) -> Callable[[IndexRow], bool] | None:
    """The target-row filter the flags ask for, or None for every target view."""
    azimuths: list[float] | None = args.azimuths
    elevations: list[float] | None = args.elevations
    if args.simple:
        from synthesis.drr_dataset import simple_views

        azimuths = [a for a, _ in simple_views()]
        elevations = [0.0] if elevations is None else [e for e in elevations if abs(e) <= ANGLE_TOLERANCE]
    augmentations = set(args.augmentations) if args.augmentations is not None else None
    cases = {c.strip() for c in args.cases.split(",") if c.strip()} if args.cases is not None else None
    if azimuths is None and elevations is None and augmentations is None and cases is None:
        return None

    def include(row: IndexRow) -> bool:
        if azimuths is not None and all(abs(row.azimuth - a) > ANGLE_TOLERANCE for a in azimuths):
            return False
        if elevations is not None and all(abs(row.elevation - e) > ANGLE_TOLERANCE for e in elevations):
            return False
        if augmentations is not None and row.augmentation not in augmentations:
            return False
        return cases is None or row.case in cases

    return include


def run(args: argparse.Namespace) -> int:
    """Evaluate; exit OK, USAGE for bad settings, NOT_FOUND for a missing dataset or model folder."""
    if not (args.data / "index.csv").is_file():
        print(f"dicomnode evaluate: no DRR dataset index in {args.data}", file=sys.stderr)
        return ExitCode.NOT_FOUND
    if args.model is not None and not args.model.is_dir():
        print(f"dicomnode evaluate: model folder not found: {args.model}", file=sys.stderr)
        return ExitCode.NOT_FOUND
    if args.model is None and args.resolution is None:
        print("dicomnode evaluate: without --model, give --resolution", file=sys.stderr)
        return ExitCode.USAGE
    if args.input_checks is not None and args.model is None:
        print("dicomnode evaluate: --input-checks needs --model", file=sys.stderr)
        return ExitCode.USAGE
    bad_steps = args.steps is not None and args.steps < 1
    if (args.resolution is not None and args.resolution < 11) or bad_steps or args.max_batch < 1:
        print("dicomnode evaluate: --resolution >= 11 (SSIM window), --steps >= 1, --max-batch >= 1", file=sys.stderr)
        return ExitCode.USAGE

    from synthesis.eval_report import STATIC_SELECTIONS, format_selections
    from synthesis.eval_suite import format_targets, run_evaluation
    from synthesis.evaluate import format_grid, format_table
    from synthesis.input_checks import format_checks

    meta = DEFAULT_META  # baselines only: no sampler runs
    if args.model is not None:
        try:
            meta = load_model_meta(args.model)
        except ModelMetaError as e:
            raise ModelLoadError(str(e)) from e  # FAILURE via main
    steps, guidance = meta.sampler(args.steps, args.guidance)
    if args.model is not None:
        origin = sampler_origin(args.steps, meta), sampler_origin(args.guidance, meta)
        print(f"sampler: {steps} steps ({origin[0]}), guidance {guidance:g} ({origin[1]})")
    # A SynthesisError from here on (unreadable image, bad model) is FAILURE via main.
    report = run_evaluation(
        args.model,
        args.data,
        args.out,
        _selection(args),
        input_checks=STATIC_SELECTIONS[args.input_checks] if args.input_checks else None,
        resolution=args.resolution,
        steps=steps,
        guidance=guidance,
        seed=args.seed,
        max_batch=args.max_batch,
        device=args.device,
    )
    result = report.evaluation
    print(format_table(result.summaries))
    print()
    print(format_selections(report.selections))
    if result.grid:
        print(format_grid(result.grid))
    if report.checks is not None:
        print()
        print(format_checks(report.checks))
    print()
    print(format_targets(report.targets))
    print(f"metrics: {result.metrics_csv}\nsummary: {result.summary_csv}\nplot: {result.plot}")
    print(f"selections: {report.selections_csv}\nangle plots: {report.angles_plot}\ntargets: {report.targets_json}")
    if report.checks is not None:
        print(f"input checks: {report.checks.json_path}, {report.checks.csv_path}")
    return ExitCode.OK
