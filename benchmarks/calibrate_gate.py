"""Calibrate a model's consistency gate on its training data and write it to dicomnode-model.json.

    python benchmarks/calibrate_gate.py models/demo                 # renders the PA DRRs (~1 min)
    python benchmarks/calibrate_gate.py models/demo --data DIR      # a DRR dataset already rendered
    python benchmarks/calibrate_gate.py models/demo --write         # also update the model's file

The gate's score (``synthesis.consistency``, default method ``denoise``: the model's denoising
error on the input at pose (0, 0), dB, higher = better) is computed on every PA view (azimuth 0,
elevation 0) of the dataset, and on inputs the gate must refuse (a uniform image, pydicom's real
chest CR RG1_UNCR). The threshold is the lowest training score minus ``--margin`` (default 1 dB
for the dB methods), so every training PA passes with room for the small numeric differences of
another device or dtype. Without ``--data`` the PA views are rendered as ``models/demo/recipe.json``
records (the generated patients GP000.. of the bundled LIDC-IDRI-0001 CT, with its seed; the
held-out patients are among them) at the model's resolution. A PA flipped left-right is scored and
shown but not required to be refused: the demo model was trained on mirrored patients, so a
mirrored chest is an input it can read (it answers it with the mirrored views).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from synthesis.consistency import DEFAULT_SEED, DEFAULT_TIMESTEPS, denoising_score  # noqa: E402
from synthesis.model_meta import GATE_METHODS, META_FILENAME  # noqa: E402

DEFAULT_MARGIN = {"denoise": 1.0, "denoise-uncond": 1.0, "identity-ssim": 0.05}


def render_pa(out: Path, size: int, patients: int, seed: int, n_points: int) -> Path:
    from synthesis.drr import DrrGeometry, example_ct
    from synthesis.drr_dataset import grid_views
    from synthesis.patients import example_labels, render_patients

    geometry = DrrGeometry.for_size(size, n_points=n_points)
    volume = example_ct()
    render_patients(
        volume, example_labels(volume), out, geometry, grid_views([0.0], [0.0]), patients, seed, progress=False
    )
    return out


def recipe_data(model: Path) -> dict:
    path = model / "recipe.json"
    data = json.loads(path.read_text(encoding="utf-8")).get("data", {}) if path.is_file() else {}
    return {"patients": data.get("patients", 64), "seed": data.get("seed", 11), "n_points": data.get("n_points", 250)}


def pa_images(data: Path, resolution: int) -> list[tuple[str, np.ndarray]]:
    from synthesis.drr_dataset import load_index
    from synthesis.training_data import load_drr_image

    rows = [r for r in load_index(data) if r.azimuth == 0 and r.elevation == 0]
    if not rows:
        raise SystemExit(f"{data} has no PA views (azimuth 0, elevation 0)")
    return [(f"{r.case}/aug{r.augmentation}", load_drr_image(data / r.path, resolution)) for r in rows]


def must_refuse(pipe) -> list[tuple[str, np.ndarray]]:  # noqa: ANN001
    import pydicom
    from pydicom.data import get_testdata_file

    from synthesis.radiograph import prepare_radiograph

    R = pipe.resolution
    found = [("uniform grey", np.full((R, R), 0.5, np.float32))]
    path = get_testdata_file("RG1_UNCR.dcm")
    if path:
        found.append(("pydicom RG1_UNCR (real chest CR)", prepare_radiograph(pydicom.dcmread(path), R).image))
    return found


def score(pipe, image: np.ndarray, method: str) -> float:  # noqa: ANN001
    if method == "identity-ssim":
        from synthesis.consistency import identity_ssim

        view = pipe(image, [0.0], [0.0], num_inference_steps=20, guidance_scale=1.5, generator=0).images[0]
        return identity_ssim(view, image).value
    return denoising_score(pipe, image, conditional=method == "denoise").value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="model folder (holds model_index.json)")
    parser.add_argument("--data", type=Path, help="DRR dataset folder (index.csv); rendered when left out")
    parser.add_argument("--method", choices=GATE_METHODS, default="denoise")
    parser.add_argument("--margin", type=float, default=None, help="threshold = lowest training score - margin")
    parser.add_argument("--write", action="store_true", help=f"write the gate into MODEL/{META_FILENAME}")
    args = parser.parse_args(argv)

    import torch

    from synthesis.pipeline import SvdrrPipeline

    torch.manual_seed(0)
    pipe = SvdrrPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    with tempfile.TemporaryDirectory() as tmp:
        rendering = recipe_data(args.model)
        data = args.data or render_pa(Path(tmp) / "drr", pipe.resolution, **rendering)
        training = pa_images(data, pipe.resolution)
        scores = np.array([score(pipe, image, args.method) for _, image in training])
    margin = DEFAULT_MARGIN[args.method] if args.margin is None else args.margin
    threshold = round(float(scores.min()) - margin, 2)
    for (name, _), value in zip(training, scores, strict=True):
        print(f"{name:32s} {value:8.3f}  pass")
    refused_ok = True
    refused: dict[str, float] = {}
    for name, image in must_refuse(pipe):
        value = score(pipe, image, args.method)
        refused[name] = round(value, 3)
        verdict = "refused" if value < threshold else "PASSES (should be refused)"
        refused_ok &= value < threshold
        print(f"{name:32s} {value:8.3f}  {verdict}")
    flipped = score(pipe, training[0][1][:, ::-1].copy(), args.method)
    print(
        f"{'PA flipped left-right':32s} {flipped:8.3f}  "
        f"{'passes' if flipped >= threshold else 'refused'} (either is fine)"
    )
    calibration = {
        "data": "PA DRRs (azimuth 0, elevation 0) of "
        + (
            str(args.data)
            if args.data
            else "the generated patients GP000.. of recipe.json (seed {seed})".format(**rendering)
        ),
        "n": int(scores.size),
        "mean": round(float(scores.mean()), 3),
        "std": round(float(scores.std(ddof=1)) if scores.size > 1 else 0.0, 3),
        "min": round(float(scores.min()), 3),
        "p05": round(float(np.percentile(scores, 5)), 3),
        "p50": round(float(np.percentile(scores, 50)), 3),
        "max": round(float(scores.max()), 3),
        "margin": margin,
        "timesteps": list(DEFAULT_TIMESTEPS),
        "noise_seed": DEFAULT_SEED,
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "command": "python benchmarks/calibrate_gate.py MODEL --write",
        "refused_when_calibrated": refused,
        "pa_flipped_left_right": round(flipped, 3),
    }
    print(f"threshold {threshold} ({args.method}; lowest training score {scores.min():.3f} - margin {margin})")
    if args.write:
        path = args.model / META_FILENAME
        meta = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"format": 1}
        meta["gate"] = {"method": args.method, "threshold": threshold, "calibration": calibration}
        path.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {path}")
    return 0 if refused_ok else 1


if __name__ == "__main__":
    sys.exit(main())
