"""``dicomnode train``: weak-to-strong training of an SV-DRR model on a DRR dataset folder.

Reads the folder ``dicomnode drr render`` writes; writes ``OUT/checkpoints/step-N/``, ``OUT/loss.csv``
and, at the end, ``OUT/model/`` in the published layout (``dicomnode synthesize --model OUT/model``).
Running the same command again resumes exactly from the latest checkpoint. torch loads only when the
command runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dicomnode.cli.common import accept_negative_lists
from dicomnode.cli.exitcodes import ExitCode
from dicomnode.errors import SynthesisError

# The published recipe (svdrr-spec.md): 256 px then 512 then 1024, RES:STEPS:BATCH:LR.
DEFAULT_STAGES = "256:200000:64:5e-6,512:100000:32:3e-6,1024:100000:8:1e-6"
ARCHS = ("demo", "tiny-pixel", "tiny", "published")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train an SV-DRR model on a DRR dataset (resumes from the latest checkpoint)",
        description="Train the transformer and cc_projection stage by stage at rising resolution. "
        "Either from scratch (--arch) or from a model folder (--from).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", type=Path, required=True, metavar="DIR", help="DRR dataset folder (index.csv)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="run folder (created)")
    p.add_argument("--stages", default=DEFAULT_STAGES, metavar="RES:STEPS:BATCH:LR,...", help="training stages")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--from", dest="init_from", type=Path, metavar="MODEL_DIR", help="start from this model")
    source.add_argument(
        "--from-pixart",
        dest="init_pixart",
        type=Path,
        metavar="DIR",
        help="start from a PixArt-Sigma diffusers folder (transformer/, vae/): patch embedding widened to 8 channels",
    )
    source.add_argument(
        "--arch",
        choices=ARCHS,
        default=None,
        help="start from random weights of this shape (default published)",
    )
    p.add_argument(
        "--shape",
        default=None,
        metavar="LAYERS,HEADS,HEAD_DIM,PATCH",
        help="with --arch demo: another pixel-space shape (default 6,4,32,4: 1.75 M parameters)",
    )
    p.add_argument(
        "--aligned-condition",
        action="store_true",
        help="with --arch demo: also condition on the PA foreshortened to each requested view "
        "(3 input channels; synthesis/aligned.py)",
    )
    p.add_argument(
        "--grow-patch",
        type=int,
        default=1,
        metavar="FACTOR",
        help="with --from: patch and image size FACTOR times larger, each block starting as its old pixel plus "
        "a small symmetry-breaking jitter (a 64 px patch-4 model continues at 128 px with patch 8: the same "
        "tokens, the same cost per step)",
    )
    p.add_argument("--image-encoder", type=Path, metavar="DIR", help="with --from-pixart: a CLIP vision model folder")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation, data order, noise and dropout")
    p.add_argument("--warmup-steps", type=int, default=1000, help="linear lr warm-up steps per stage")
    p.add_argument("--checkpoint-every", type=int, default=1000, metavar="N", help="optimizer steps")
    p.add_argument("--hold-out-azimuths", default="", metavar="DEG,...", help="target azimuths not trained on")
    p.add_argument("--hold-out-augmentations", default="", metavar="N,...", help="augmented volumes not trained on")
    p.add_argument("--hold-out-cases", default="", metavar="CASE,...", help="cases (patients) not trained on")
    p.add_argument(
        "--prediction-type",
        choices=["epsilon", "v_prediction"],
        default=None,
        help="what the model predicts (default: the starting model's; epsilon from scratch, as published)",
    )
    p.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for memory")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--no-resume", action="store_true", help="start over even if checkpoints exist")
    p.add_argument(
        "--stop-after",
        type=int,
        default=None,
        metavar="N",
        help="stop after optimizer step N (a checkpoint and OUT/model-step-N are written); "
        "the same command without it resumes the run exactly",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    accept_negative_lists(p)
    p.set_defaults(func=run)


def parse_shape(text: str) -> dict[str, int]:
    """``LAYERS,HEADS,HEAD_DIM,PATCH`` -> keywords of :func:`synthesis.architecture.demo`."""
    try:
        layers, heads, head_dim, patch = (int(v) for v in text.split(","))
    except ValueError as e:
        raise SynthesisError(f"--shape is LAYERS,HEADS,HEAD_DIM,PATCH (four integers), got {text!r}") from e
    return {"layers": layers, "heads": heads, "head_dim": head_dim, "patch_size": patch}


def run(args: argparse.Namespace) -> int:
    """Train; exit OK, USAGE for bad settings, NOT_FOUND for a missing dataset or model folder."""
    if not (args.data / "index.csv").is_file():
        print(f"dicomnode train: no DRR dataset index in {args.data}", file=sys.stderr)
        return ExitCode.NOT_FOUND
    for folder in (args.init_from, args.init_pixart, args.image_encoder):
        if folder is not None and not folder.is_dir():
            print(f"dicomnode train: model folder not found: {folder}", file=sys.stderr)
            return ExitCode.NOT_FOUND

    from synthesis.architecture import demo, published, tiny
    from synthesis.train import TrainConfig, parse_stages, train
    from synthesis.training_data import all_of, exclude_augmentations, exclude_azimuths, exclude_cases

    try:
        stages = parse_stages(args.stages)
        arch = None
        if args.init_from is None and args.init_pixart is None:
            resolution = stages[0].resolution
            name = args.arch or "published"
            shape = parse_shape(args.shape) if args.shape else {}
            if (shape or args.aligned_condition) and name != "demo":
                raise SynthesisError("--shape and --aligned-condition go with --arch demo (a pixel-space model)")
            arch = {
                "demo": lambda: demo(resolution, **shape, aligned_condition=args.aligned_condition),
                "tiny-pixel": lambda: tiny(resolution, vae=False, clip=False),
                "tiny": lambda: tiny(resolution),
                "published": lambda: published(resolution),
            }[name]()
        held_out = [float(v) for v in args.hold_out_azimuths.split(",") if v.strip()]
        held_out_augs = [int(v) for v in args.hold_out_augmentations.split(",") if v.strip()]
        held_out_cases = [v.strip() for v in args.hold_out_cases.split(",") if v.strip()]
        filters = ([exclude_azimuths(held_out)] if held_out else []) + (
            [exclude_augmentations(held_out_augs)] if held_out_augs else []
        )
        filters += [exclude_cases(held_out_cases)] if held_out_cases else []
        config = TrainConfig(
            stages=stages,
            seed=args.seed,
            arch=arch,
            init_from=args.init_from,
            init_pixart=args.init_pixart,
            init_image_encoder=args.image_encoder,
            grow_patch=args.grow_patch,
            warmup_steps=args.warmup_steps,
            checkpoint_every=args.checkpoint_every,
            gradient_checkpointing=args.gradient_checkpointing,
            device=args.device,
            include=all_of(*filters) if filters else None,
            progress=not args.no_progress,
            prediction_type=args.prediction_type,
        )
    except (SynthesisError, ValueError) as e:
        print(f"dicomnode train: {e}", file=sys.stderr)
        return ExitCode.USAGE
    if args.stop_after is not None and args.stop_after < 1:
        print("dicomnode train: --stop-after must be >= 1", file=sys.stderr)
        return ExitCode.USAGE
    result = train(config, args.data, args.out, resume=not args.no_resume, stop_after=args.stop_after)
    if args.stop_after is not None and result.parent.name == "checkpoints":
        print(f"stopped at checkpoint {result}; model: {args.out / ('model-' + result.name)}")
    else:
        print(f"trained model: {result}")
    return ExitCode.OK
