"""``dicomnode synthesize``: run the engine on one DICOM radiograph, write PNGs and a contact sheet."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from dicomnode.cli.common import accept_negative_lists, degrees, sampler_origin
from dicomnode.cli.exitcodes import ExitCode
from dicomnode.errors import DicomInputError, ModelLoadError
from dicomnode.model_location import resolve_model
from synthesis.model_meta import ModelMeta, ModelMetaError, load_model_meta

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synthesize",
        help="synthesise views from one radiograph into PNG files",
        description="Synthesise views at other angles from one PA radiograph (DICOM CR/DX/SC). "
        "Writes view_NN_az..._el....png per view and contact_sheet.png. The images are synthetic.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("input", type=Path, help="DICOM file of a PA radiograph")
    p.add_argument(
        "--model",
        default="demo",
        help='model folder in the published SV-DRR layout, or "demo": the demonstration model shipped with the package',
    )
    p.add_argument("--azimuths", type=degrees, default=[-60.0, -30.0, 30.0, 60.0], help="degrees, comma-separated")
    p.add_argument("--elevations", type=degrees, default=[], help="degrees, one per azimuth (default all 0)")
    # Unset (SUPPRESS): the model's recommended values from its dicomnode-model.json.
    recommended = " (default: the model's recommended, from its dicomnode-model.json)"
    p.add_argument("--steps", type=int, default=argparse.SUPPRESS, help="DPM-Solver++ steps" + recommended)
    p.add_argument(
        "--guidance",
        type=float,
        default=argparse.SUPPRESS,
        help="classifier-free guidance scale, 1 = off" + recommended,
    )
    p.add_argument("--seed", type=int, default=0, help="request seed; each view's noise derives from it")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), float32, float16, bfloat16")
    p.add_argument("--max-batch", type=int, default=8, help="views denoised together")
    p.add_argument("--out", type=Path, required=True, help="output folder (created)")
    accept_negative_lists(p)
    p.set_defaults(func=run)


def elevation_problem(elevations: Sequence[float], meta: ModelMeta) -> str | None:
    """Why the requested elevations are outside what the model was trained on, or None.

    A view at an elevation the model never learned would still be labelled with that elevation:
    refuse it, as the node does (``dicomnode.gate``), rather than write a mislabelled view.
    """
    low, high = meta.intended.elevation_range
    outside = sorted({float(e) for e in elevations if not low <= float(e) <= high})
    if not outside:
        return None
    shown = ", ".join(f"{e:g}" for e in outside)
    trained = f"only at elevation {low:g}" if low == high else f"at elevations {low:g}..{high:g} degrees"
    return (
        f"elevation {shown} requested, but the model was trained {trained} "
        f"({meta.source or 'its defaults'}); it would label views it never learned"
    )


def run(args: argparse.Namespace) -> int:
    import pydicom

    from synthesis.contact_sheet import contact_sheet, save_png, windowed_8bit
    from synthesis.device import resolve_device, resolve_dtype
    from synthesis.pipeline import SvdrrPipeline
    from synthesis.radiograph import prepare_radiograph, restore_views

    model = resolve_model(args.model, Path.cwd())
    try:
        meta = load_model_meta(model)
    except ModelMetaError as e:
        raise ModelLoadError(str(e)) from e
    if problem := elevation_problem(args.elevations, meta):
        print(f"dicomnode: refused: {problem}", file=sys.stderr)
        return ExitCode.USAGE
    given_steps, given_guidance = getattr(args, "steps", None), getattr(args, "guidance", None)
    steps, guidance = meta.sampler(given_steps, given_guidance)
    origin = sampler_origin(given_steps, meta), sampler_origin(given_guidance, meta)
    print(f"steps {steps} ({origin[0]}), guidance {guidance:g} ({origin[1]})")
    try:
        ds = pydicom.dcmread(args.input)
    except (OSError, pydicom.errors.InvalidDicomError) as e:
        raise DicomInputError(f"cannot read {args.input} as DICOM: {e}") from e
    device = resolve_device(args.device)
    pipe = SvdrrPipeline.from_pretrained(model, torch_dtype=resolve_dtype(args.dtype, device), device=device)
    prepared = prepare_radiograph(ds, pipe.resolution)
    out = pipe(
        prepared.image,
        azimuths=args.azimuths,
        elevations=args.elevations,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=args.seed,
        max_batch=args.max_batch,
    )
    restored = restore_views(out.images, prepared.placement)
    source = restore_views(prepared.image[None], prepared.placement)
    args.out.mkdir(parents=True, exist_ok=True)
    tiles = [windowed_8bit(source.pixels[0], source.window_center[0], source.window_width[0])]
    labels = ["input (PA)"]
    for i, (view, pixels) in enumerate(zip(out.views, restored.pixels, strict=True)):
        tile = windowed_8bit(pixels, restored.window_center[i], restored.window_width[i])
        save_png(tile, args.out / f"view_{i:02d}_az{view.azimuth:+04.0f}_el{view.elevation:+03.0f}.png")
        tiles.append(tile)
        labels.append(f"SYNTHETIC\n{view.label()}")
    contact_sheet(tiles, labels).save(args.out / "contact_sheet.png")
    print(
        f"wrote {len(out.views)} synthetic views and contact_sheet.png to {args.out} "
        f"({out.timings['total_s']:.1f} s on {device}, model {pipe.model_identity[:12]})"
    )
    return ExitCode.OK
