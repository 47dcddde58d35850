"""``dicomnode evaluate``: PSNR and SSIM of synthesised views against a DRR dataset's ground truth.

Scores the model (``--model``) and two baselines that need none (the PA input itself, and the PA
input foreshortened by |cos(azimuth)|) on the selected target views; writes ``OUT/metrics.csv``,
``OUT/summary.csv`` and ``OUT/metrics.png`` and prints the summary table. torch loads only when the
command runs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from dicomnode.cli.common import accept_negative_lists, degrees
from dicomnode.cli.exitcodes import ExitCode

if TYPE_CHECKING:  # synthesis imports torch; only the command's run does
    from synthesis.drr_dataset import IndexRow

ANGLE_TOLERANCE = 1e-6  # degrees: index angles are written with 10 significant digits


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
        "Writes OUT/metrics.csv, OUT/summary.csv and OUT/metrics.png.",
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
        "--augmentations", type=_ints, default=None, metavar="N,...", help="augmentations to score (default all)"
    )
    p.add_argument("--cases", default=None, metavar="CASE,...", help="cases to score (default all)")
    p.add_argument("--steps", type=int, default=20, help="DPM-Solver++ steps")
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--seed", type=int, default=0, help="request seed; each view's noise derives from it")
    p.add_argument("--max-batch", type=int, default=8, help="views denoised together")
    p.add_argument("--device", default="cpu", help="auto, cpu, cuda or cuda:N")
    accept_negative_lists(p)
    p.set_defaults(func=run)


def _selection(args: argparse.Namespace) -> Callable[[IndexRow], bool] | None:
    """The target-row filter the flags ask for, or None for every target view."""
    azimuths: list[float] | None = args.azimuths
    elevation_zero = False
    if args.simple:
        from synthesis.drr_dataset import simple_views

        azimuths, elevation_zero = [a for a, _ in simple_views()], True
    augmentations = set(args.augmentations) if args.augmentations is not None else None
    cases = {c.strip() for c in args.cases.split(",") if c.strip()} if args.cases is not None else None
    if azimuths is None and augmentations is None and cases is None:
        return None

    def include(row: IndexRow) -> bool:
        if azimuths is not None and all(abs(row.azimuth - a) > ANGLE_TOLERANCE for a in azimuths):
            return False
        if elevation_zero and abs(row.elevation) > ANGLE_TOLERANCE:
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
    if (args.resolution is not None and args.resolution < 11) or args.steps < 1 or args.max_batch < 1:
        print("dicomnode evaluate: --resolution >= 11 (SSIM window), --steps >= 1, --max-batch >= 1", file=sys.stderr)
        return ExitCode.USAGE

    from synthesis.evaluate import evaluate, format_table

    # A SynthesisError from here on (unreadable image, bad model) is FAILURE via main.
    result = evaluate(
        args.model,
        args.data,
        args.out,
        _selection(args),
        resolution=args.resolution,
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        max_batch=args.max_batch,
        device=args.device,
    )
    print(format_table(result.summaries))
    print(f"metrics: {result.metrics_csv}\nsummary: {result.summary_csv}\nplot: {result.plot}")
    return ExitCode.OK
