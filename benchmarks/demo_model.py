"""Reproduce the evaluation table of the shipped demo model (models/demo/MODEL_CARD.md).

    python benchmarks/demo_model.py                 # renders the DRRs (about 16 min on 2 cores)
    python benchmarks/demo_model.py --data DIR      # reuse a dataset rendered with the same recipe

It renders the dataset exactly as ``models/demo/recipe.json`` records (``data.command``, a
``dicomnode drr render`` command line whose ``DATA`` stands for the dataset folder; a recipe without
one renders the bundled CT on the simple view set with its augmentation seed), evaluates the model
and the two model-free baselines on the held-out selections the card reports, prints the tables,
and compares each figure with those stored in ``models/demo/evaluation/<selection>/``: the means of
``summary.csv`` and ``selections.csv`` and the figures of ``input_checks.json``. Exit status 0 when
every number is reproduced (the engine is deterministic on the CPU for a fixed seed), 1 otherwise.

The held-out selections: a recipe with ``hold_out_cases`` (generated patients) has
``held-out-patients``, every target view of those cases, and with ``validation_cases`` also
``validation-patients`` (patients outside every training set, on which the sampler settings were
chosen, so that the held-out figures are not tuned on); it runs the input-use checks on each (on
the views ``evaluation.input_checks`` names, default ``wide-el0``: |azimuth| >= 30 at elevation 0).
An older recipe has ``heldout-angles`` and ``unseen-augmentations`` and no checks.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shlex
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dicomnode import cli  # noqa: E402
from synthesis.drr import DrrGeometry, example_ct  # noqa: E402
from synthesis.drr_dataset import IndexRow, render_dataset, simple_views  # noqa: E402
from synthesis.eval_report import SELECTIONS_NAME, STATIC_SELECTIONS, Selection, format_selections  # noqa: E402
from synthesis.eval_suite import Report, format_targets, run_evaluation  # noqa: E402
from synthesis.evaluate import GRID_NAME, SUMMARY_NAME, format_grid, format_table  # noqa: E402
from synthesis.input_checks import CHECKS_JSON_NAME, format_checks  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _of_cases(cases: list[str]) -> object:
    chosen = {str(c) for c in cases}

    def patients(row: IndexRow) -> bool:
        return row.case in chosen

    return patients


def selections(recipe: dict) -> dict[str, object]:
    """The held-out selections (see the module docstring), each a filter on target rows."""
    if "hold_out_cases" in recipe:
        found = {"held-out-patients": _of_cases(recipe["hold_out_cases"])}
        if recipe.get("validation_cases"):
            found["validation-patients"] = _of_cases(recipe["validation_cases"])
        return found
    held_angles = {float(a) for a in recipe["hold_out_azimuths"]}
    held_augs = {int(a) for a in recipe["hold_out_augmentations"]}

    def angles(row: IndexRow) -> bool:
        return int(row.augmentation) not in held_augs and float(row.azimuth) in held_angles

    def volumes(row: IndexRow) -> bool:
        return int(row.augmentation) in held_augs

    return {"heldout-angles": angles, "unseen-augmentations": volumes}


def check_selection(recipe: dict) -> Selection | None:
    """The views of the input-use checks: only for recipes of generated patients."""
    if "hold_out_cases" not in recipe:
        return None
    return STATIC_SELECTIONS[str(recipe["evaluation"].get("input_checks", "wide-el0"))]


def render_argv(command: str, out: Path) -> list[str]:
    """``dicomnode drr render ... --out DATA ...`` as arguments of ``dicomnode``, DATA replaced by ``out``."""
    argv = shlex.split(command)
    if argv[:1] == ["dicomnode"]:
        argv = argv[1:]
    if argv[:2] != ["drr", "render"] or "DATA" not in argv:
        raise SystemExit(f"recipe data.command is not a 'dicomnode drr render ... DATA' line: {command!r}")
    return [str(out) if a == "DATA" else a for a in argv]


def evaluated_render_argv(recipe: dict, out: Path) -> list[str]:
    """The recipe's render command for only the evaluated patients (held out and validation)."""
    argv = render_argv(recipe["data"]["command"], out)
    cases = [*recipe.get("hold_out_cases", []), *recipe.get("validation_cases", [])]
    evaluated = sorted(int(c[2:]) for c in cases if c.startswith("GP"))
    if "--patients" in argv and evaluated:
        at = argv.index("--patients") + 1
        argv[at] = str(max(int(argv[at]), evaluated[-1] + 1))  # validation patients may lie beyond
        argv += ["--first-patient", str(evaluated[0])]  # each patient is drawn alone
    return argv


def render(recipe: dict, out: Path) -> Path:
    data = recipe["data"]
    if "command" in data:
        code = cli.main(evaluated_render_argv(recipe, out))
        if code != 0:
            raise SystemExit(f"rendering the dataset failed (exit {code}): {data['command']}")
        return out
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


Figures = dict[tuple[str, ...], float]


def stored_figures(folder: Path) -> Figures:
    """Every figure an evaluation folder holds, keyed by file and row: summary and selection means
    (PSNR, SSIM), the patch-grid ratios and the input checks' numbers (verdicts as 1 / 0). Missing
    files give nothing."""
    figures: Figures = {}
    for name, key_columns in ((SUMMARY_NAME, ("method", "azimuth")), (SELECTIONS_NAME, ("selection", "method"))):
        if (folder / name).is_file():
            with (folder / name).open() as f:
                for r in csv.DictReader(f):
                    for metric in ("psnr", "ssim"):
                        figures[(name, *(r[c] for c in key_columns), metric)] = float(r[metric])
    if (folder / GRID_NAME).is_file():
        for key, value in json.loads((folder / GRID_NAME).read_text()).items():
            figures[(GRID_NAME, key)] = float(value)
    if (folder / CHECKS_JSON_NAME).is_file():
        checks = json.loads((folder / CHECKS_JSON_NAME).read_text())
        for check in ("grey", "flip"):
            for key, value in checks[check].items():
                if isinstance(value, dict):  # the flip check's near-lateral figures
                    figures.update({(CHECKS_JSON_NAME, check, key, k): float(v) for k, v in value.items()})
                elif value is not None:
                    figures[(CHECKS_JSON_NAME, check, key)] = float(value)
    return figures


def compare(fresh: Figures, stored: Figures, tol: float) -> list[str]:
    """Each stored figure against the fresh run's: missing, or off by more than ``tol``."""
    problems = []
    for key, old in stored.items():
        label = "/".join(key)
        if key not in fresh:
            problems.append(f"{label}: missing from the new run")
            continue
        new = fresh[key]
        same = (math.isnan(old) and math.isnan(new)) or (math.isinf(old) and old == new) or abs(new - old) <= tol
        if not same:
            problems.append(f"{label}: card {old:.4f}, now {new:.4f}")
    return problems


def card_rows(name: str, report: Report) -> list[str]:
    """Markdown rows for the model card: the wide means, then the selections, then the checks."""
    rows = []
    for method, summary in report.evaluation.summaries.items():
        wide, overall = summary.wide, summary.overall
        rows.append(
            f"| {name} | {method} | {wide.psnr:.2f} | {wide.ssim:.3f} | {overall.psnr:.2f} | {overall.ssim:.3f} | "
            f"{wide.n} |"
        )
    for selection, per in report.selections.items():
        for method, mean in per.items():
            if mean.n:
                rows.append(f"| {name} | {selection} | {method} | {mean.psnr:.2f} | {mean.ssim:.3f} | {mean.n} |")
    if report.checks is not None:
        g, f = report.checks.grey, report.checks.flip
        rows.append(
            f"| {name} | grey input | PSNR {g.psnr_pa:.2f} from PA, {g.psnr_grey:.2f} from grey | "
            f"drop {g.psnr_drop:.2f} dB | {'pass' if g.passed else 'FAIL'} | {g.n} |"
        )
        rows.append(
            f"| {name} | flipped PA, abs(azimuth) <= {f.max_azimuth:g} | SSIM {f.ssim_to_mirrored_truth:.3f} to "
            f"mirrored truth, {f.ssim_to_unflipped_output:.3f} to unflipped output | "
            f"{f.fraction_closer_to_mirrored_truth:.0%} of views closer to the mirror | "
            f"{'pass' if f.passed else 'FAIL'} | {f.n} |"
        )
        if (lateral := f.near_lateral) is not None:
            rows.append(
                f"| {name} | flipped PA, near-lateral (not judged) | SSIM {lateral.ssim_to_mirrored_truth:.3f} to "
                f"mirrored truth, {lateral.ssim_to_unflipped_output:.3f} to unflipped output | truth to mirrored "
                f"truth {lateral.ssim_truth_to_mirrored_truth:.3f} (judged views {f.ssim_truth_to_mirrored_truth:.3f}) "
                f"| - | {lateral.n} |"
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "demo")
    ap.add_argument("--data", type=Path, default=None, help="a dataset rendered with the recipe (else rendered)")
    ap.add_argument("--out", type=Path, default=None, help="where to write the new evaluation (default: temp)")
    ap.add_argument("--tolerance", type=float, default=1e-3)
    ap.add_argument("--device", default="cpu", help="auto, cpu, cuda or cuda:N (the card's numbers: cpu)")
    ap.add_argument("--record", action="store_true", help="write the evaluation into the model folder (card numbers)")
    args = ap.parse_args(argv)

    recipe = json.loads((args.model / "recipe.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or render(recipe, Path(tmp) / "drr")
        out = args.model / "evaluation" if args.record else args.out or Path(tmp) / "evaluation"
        ev = recipe["evaluation"]
        problems: list[str] = []
        for name, include in selections(recipe).items():
            report = run_evaluation(
                args.model,
                data,
                out / name,
                include,  # type: ignore[arg-type]
                input_checks=check_selection(recipe),
                steps=int(ev["steps"]),
                guidance=float(ev["guidance"]),
                seed=int(ev["seed"]),
                max_batch=int(ev["max_batch"]),
                device=args.device,
            )
            print(f"\n== {name} ==")
            print(format_table(report.evaluation.summaries))
            print(format_selections(report.selections))
            if report.evaluation.grid:
                print(format_grid(report.evaluation.grid))
            if report.checks is not None:
                print(format_checks(report.checks))
            print(format_targets(report.targets))
            if args.record:
                print("\n".join(card_rows(name, report)))
            else:
                stored = stored_figures(args.model / "evaluation" / name)
                if not stored:
                    problems.append(f"{name}: nothing stored in {args.model / 'evaluation' / name}")
                fresh = stored_figures(out / name)
                problems += [f"{name} {p}" for p in compare(fresh, stored, args.tolerance)]
    if problems:
        print("\nNOT reproduced:\n  " + "\n  ".join(problems))
        return 1
    print("\nRecorded." if args.record else "\nEvery number in the model card's evaluation was reproduced.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
