"""Reproduce the evaluation table of the shipped demo model (models/demo/MODEL_CARD.md).

    python benchmarks/demo_model.py                 # renders the DRRs (about 7 min on 2 cores)
    python benchmarks/demo_model.py --data DIR      # reuse a dataset rendered with the same recipe

It renders the dataset exactly as ``models/demo/recipe.json`` records (the bundled LIDC-IDRI-0001
CT, the simple view set, the same augmentation seed), evaluates the model and the two model-free
baselines on the two held-out selections the card reports, prints the tables, and compares each
mean with the numbers stored in ``models/demo/evaluation/*/summary.csv``. Exit status 0 when every
number is reproduced (the engine is deterministic on the CPU for a fixed seed), 1 otherwise.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from synthesis.drr import DrrGeometry, example_ct  # noqa: E402
from synthesis.drr_dataset import IndexRow, render_dataset, simple_views  # noqa: E402
from synthesis.evaluate import EvaluationResult, evaluate, format_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def selections(recipe: dict) -> dict[str, object]:
    """The two held-out selections: unseen angles on seen volumes, and unseen volumes at all angles."""
    held_angles = {float(a) for a in recipe["hold_out_azimuths"]}
    held_augs = {int(a) for a in recipe["hold_out_augmentations"]}

    def angles(row: IndexRow) -> bool:
        return int(row.augmentation) not in held_augs and float(row.azimuth) in held_angles

    def volumes(row: IndexRow) -> bool:
        return int(row.augmentation) in held_augs

    return {"heldout-angles": angles, "unseen-augmentations": volumes}


def render(recipe: dict, out: Path) -> Path:
    data = recipe["data"]
    geometry = DrrGeometry.for_size(int(data["size"]))
    render_dataset(
        example_ct(),
        out,
        geometry,
        simple_views(),
        augmentations=int(data["augmentations"]),
        seed=int(data["seed"]),
        progress=True,
    )
    return out


def stored_summary(path: Path) -> dict[tuple[str, str], tuple[float, float]]:
    with path.open() as f:
        return {(r["method"], r["azimuth"]): (float(r["psnr"]), float(r["ssim"])) for r in csv.DictReader(f)}


def compare(result: EvaluationResult, stored: dict[tuple[str, str], tuple[float, float]], tol: float) -> list[str]:
    fresh = stored_summary(result.summary_csv)
    problems = []
    for key, (psnr, ssim) in stored.items():
        if key not in fresh:
            problems.append(f"{key}: missing from the new run")
            continue
        p, s = fresh[key]
        same_psnr = (math.isinf(p) and math.isinf(psnr)) or abs(p - psnr) <= tol
        if not same_psnr or abs(s - ssim) > tol:
            problems.append(f"{key}: card PSNR {psnr:.3f} SSIM {ssim:.4f}, now PSNR {p:.3f} SSIM {s:.4f}")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "demo")
    ap.add_argument("--data", type=Path, default=None, help="a dataset rendered with the recipe (else rendered)")
    ap.add_argument("--out", type=Path, default=None, help="where to write the new evaluation (default: temp)")
    ap.add_argument("--tolerance", type=float, default=1e-3)
    ap.add_argument("--record", action="store_true", help="write the evaluation into the model folder (card numbers)")
    args = ap.parse_args(argv)

    recipe = json.loads((args.model / "recipe.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or render(recipe, Path(tmp) / "drr")
        out = args.model / "evaluation" if args.record else args.out or Path(tmp) / "evaluation"
        ev = recipe["evaluation"]
        problems: list[str] = []
        for name, include in selections(recipe).items():
            result = evaluate(
                args.model,
                data,
                out / name,
                include,  # type: ignore[arg-type]
                steps=int(ev["steps"]),
                guidance=float(ev["guidance"]),
                seed=int(ev["seed"]),
                max_batch=int(ev["max_batch"]),
            )
            print(f"\n== {name} ==")
            print(format_table(result.summaries))
            if args.record:
                for method in ("model", "identity", "foreshortened"):
                    wide, overall = result.summaries[method].wide, result.summaries[method].overall
                    print(
                        f"| {name} | {method} | {wide.psnr:.2f} | {wide.ssim:.3f} | {overall.psnr:.2f} | "
                        f"{overall.ssim:.3f} | {wide.n} |"
                    )
            else:
                stored = stored_summary(args.model / "evaluation" / name / "summary.csv")
                problems += [f"{name} {p}" for p in compare(result, stored, args.tolerance)]
    if problems:
        print("\nNOT reproduced:\n  " + "\n  ".join(problems))
        return 1
    print("\nRecorded." if args.record else "\nEvery number in the model card's evaluation was reproduced.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
