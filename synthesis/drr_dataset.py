"""A folder of DRRs for training and evaluation: images, an index, and a description.

Layout of ``out_dir``::

    images/<case>_<augmentation:03d>_<view_id:04d>.png   16-bit grayscale, per-image min-max
    index.csv                                              one row per complete image
    dataset.json                                           geometry, views, seed, sources, credit

View 0 of every (case, augmentation) is the PA view (0, 0), the model's input; the target views
follow in the order given (a PA among them is not repeated). Augmentation 0 is the CT as loaded;
1..N are copies drawn by ``synthesis.drr.draw_augmentation`` from a seed derived from
``(seed, augmentation, case)``, so any one of them can be rebuilt alone.

Resume: a run killed at any point continues on the next call with the same settings. Each image is
written to a temporary file, synced and renamed (a rename is atomic on POSIX), and only then is its
index row appended and synced, so the index never names a missing or partial file. One writer per
folder at a time.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dicomnode.errors import SynthesisError
from synthesis.drr import (
    CtVolume,
    DrrGeometry,
    DrrRenderer,
    ViewLike,
    apply_augmentation,
    as_view,
    draw_augmentation,
    load_ct,
    to_uint16,
)

logger = logging.getLogger(__name__)

INDEX_NAME = "index.csv"
DESCRIPTION_NAME = "dataset.json"
IMAGES_DIR = "images"
INDEX_COLUMNS = ("patient", "case", "augmentation", "view_id", "azimuth", "elevation", "path")
PA_VIEW = (0.0, 0.0)
_TEMP_MARK = ".partial-"


# --- view sets ------------------------------------------------------------------------------------


def simple_views() -> list[tuple[float, float]]:
    """The paper's "simple" sweep: azimuth -90..+90 in 5 degree steps at elevation 0.

    That is 37 angles including 0 (the spec's "36" is the 36 targets besides the PA input, which a
    dataset stores once, as view 0).
    """
    return [(float(azimuth), 0.0) for azimuth in range(-90, 91, 5)]


def grid_views(azimuths: Sequence[float], elevations: Sequence[float]) -> list[tuple[float, float]]:
    """Every azimuth at every elevation, elevation by elevation."""
    if not azimuths or not elevations:
        raise SynthesisError(f"a grid needs azimuths and elevations, got {azimuths!r} and {elevations!r}")
    views = [(float(a), float(e)) for e in elevations for a in azimuths]
    for view in views:
        as_view(view)
    return views


def fibonacci_views(n: int) -> list[tuple[float, float]]:
    """``n`` views evenly spread over the PA hemisphere (source posterior), Fibonacci lattice.

    Source directions lie on a golden-angle spiral whose height along the posterior axis runs
    evenly over (0, 1), the hemisphere ``|azimuth| <= 90``; the paper's "hemisphere" set is such
    a lattice. Angles follow the convention in ``synthesis.drr``.
    """
    if not isinstance(n, int) or n < 1:
        raise SynthesisError(f"a Fibonacci view set needs n >= 1, got {n!r}")
    golden_angle = math.pi * (3.0 - math.sqrt(5.0))
    views = []
    for i in range(n):
        posterior = (i + 0.5) / n
        radius = math.sqrt(1.0 - posterior * posterior)
        right, superior = radius * math.cos(i * golden_angle), radius * math.sin(i * golden_angle)
        # source direction = (cos(el) sin(az), -cos(el) cos(az), -sin(el)) in RAS
        views.append((math.degrees(math.atan2(right, posterior)), math.degrees(-math.asin(superior))))
    return views


def dataset_views(targets: Sequence[ViewLike]) -> list[tuple[float, float]]:
    """PA first (view 0), then the targets in order without a repeated PA."""
    checked = [as_view(v) for v in targets]
    return [PA_VIEW] + [(v.azimuth, v.elevation) for v in checked if (v.azimuth, v.elevation) != PA_VIEW]


# --- the index ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IndexRow:
    """One complete image of the dataset; ``path`` is relative to the dataset folder."""

    patient: str
    case: str
    augmentation: int
    view_id: int
    azimuth: float
    elevation: float
    path: str

    def __post_init__(self) -> None:
        if self.augmentation < 0 or self.view_id < 0:
            raise SynthesisError(f"index row numbers must be >= 0: {self!r}")
        if Path(self.path).is_absolute() or ".." in Path(self.path).parts:
            raise SynthesisError(f"index path must be inside the dataset folder, got {self.path!r}")

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.case, self.augmentation, self.view_id)

    def to_line(self) -> str:
        buffer = io.StringIO()
        fields = [self.patient, self.case, self.augmentation, self.view_id]
        fields += [f"{self.azimuth:.10g}", f"{self.elevation:.10g}", self.path]
        csv.writer(buffer, lineterminator="\n").writerow(fields)
        return buffer.getvalue()


def load_index(out_dir: str | Path) -> list[IndexRow]:
    """The rows of ``out_dir/index.csv`` in file order; a torn last line (no newline) is ignored."""
    path = Path(out_dir) / INDEX_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise SynthesisError(f"no DRR dataset index at {path}") from e
    if not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if tuple(header or ()) != INDEX_COLUMNS:
        raise SynthesisError(f"{path} header is {header!r}, expected {list(INDEX_COLUMNS)}")
    rows = []
    for number, fields in enumerate(reader, start=2):
        try:
            patient, case, augmentation, view_id, azimuth, elevation, image = fields
            rows.append(
                IndexRow(patient, case, int(augmentation), int(view_id), float(azimuth), float(elevation), image)
            )
        except ValueError as e:
            raise SynthesisError(f"{path} line {number} is not a valid row: {fields!r}") from e
    return rows


# --- writing --------------------------------------------------------------------------------------


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary sibling, sync it, rename it over ``path``, sync the folder."""
    temporary = path.with_name(f".{path.name}{_TEMP_MARK}{os.getpid()}")
    with open(temporary, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(temporary, path)
    _fsync_dir(path.parent)


def _png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(to_uint16(image)).save(buffer, format="PNG")
    return buffer.getvalue()


def _is_complete_png(path: Path, geometry: DrrGeometry) -> bool:
    """Whether ``path`` decodes as a 16-bit PNG of the detector's size (left by a killed run)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            return im.format == "PNG" and im.mode.startswith("I") and im.size == (geometry.width, geometry.height)
    except (OSError, ValueError):
        return False


def _prepare_index(out_dir: Path) -> None:
    """Create the index with its header, or cut a torn last line left by a killed run."""
    path = out_dir / INDEX_NAME
    if not path.exists():
        _write_atomically(path, (",".join(INDEX_COLUMNS) + "\n").encode())
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        logger.warning("index %s ends in a torn line; cutting it", path)
        with open(path, "r+b") as fh:
            fh.truncate(data.rfind(b"\n") + 1)
            os.fsync(fh.fileno())


def _settings(geometry: DrrGeometry, views: Sequence[tuple[float, float]], seed: int) -> dict[str, Any]:
    return {"geometry": geometry.to_dict(), "views": [list(v) for v in views], "seed": seed}


def _update_description(out_dir: Path, settings: dict[str, Any], volume: CtVolume, cases_entry: dict) -> None:
    """Write dataset.json, refusing to mix settings with an existing dataset in the folder."""
    path = out_dir / DESCRIPTION_NAME
    if path.exists():
        description = json.loads(path.read_text(encoding="utf-8"))
        for key, value in settings.items():
            if description.get(key) != json.loads(json.dumps(value)):
                raise SynthesisError(
                    f"{out_dir} holds a dataset with other {key} ({description.get(key)!r}); "
                    f"use a new folder or the same settings ({value!r})"
                )
    else:
        description = {
            "format": "svdrr-drr-dataset/1",
            **settings,
            "view_convention": "degrees; (0, 0) is PA; +azimuth source toward the patient's right "
            "(+90 left lateral); +elevation central ray angled toward the head; see synthesis/drr.py",
            "normalisation": "each image min-max to [0, 1] on its own, then 16-bit (0..65535) PNG",
            "cases": {},
        }
    earlier = description["cases"].get(volume.case) or {}
    if len(earlier.get("augmentations", [])) > len(cases_entry["augmentations"]):
        # a run asking for fewer augmentations leaves the earlier ones' images, so keep their record
        cases_entry = {**cases_entry, "augmentations": earlier["augmentations"]}
    description["cases"][volume.case] = cases_entry
    _write_atomically(path, (json.dumps(description, indent=2) + "\n").encode())


def augmentation_seed(seed: int, augmentation: int, case: str) -> list[int]:
    """Seed material for one augmentation of one case, independent of every other."""
    return [int(seed), int(augmentation), zlib.crc32(case.encode())]


def render_dataset(
    ct_path: str | Path | CtVolume,
    out_dir: str | Path,
    geometry: DrrGeometry,
    views: Sequence[ViewLike],
    augmentations: int = 0,
    seed: int = 0,
    progress: bool = True,
    *,
    device: str = "cpu",
    batch_size: int = 1,
    on_image: Callable[[IndexRow], None] | None = None,
    postprocess: Callable[[int, np.ndarray], np.ndarray] | None = None,
    case_details: dict[str, Any] | None = None,
) -> Path:
    """Render (or finish rendering) one CT into ``out_dir``; returns the index path.

    ``views`` are the targets; PA is added as view 0. ``on_image`` is called after each image's
    index row is durable (tests use it to interrupt a run). ``postprocess(view_id, image)`` changes
    each normalised image before it is written (a detector's blur and noise; it must return [0, 1]);
    ``case_details`` are recorded with the case in dataset.json.
    """
    if not isinstance(augmentations, int) or augmentations < 0:
        raise SynthesisError(f"augmentations must be an integer >= 0, got {augmentations!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise SynthesisError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    from tqdm import tqdm

    volume = ct_path if isinstance(ct_path, CtVolume) else load_ct(ct_path)
    out_dir = Path(out_dir)
    images_dir = out_dir / IMAGES_DIR
    images_dir.mkdir(parents=True, exist_ok=True)
    for stale in images_dir.glob(f".*{_TEMP_MARK}*"):
        stale.unlink()
    all_views = dataset_views(views)
    augmentation_draws = [None] + [
        draw_augmentation(np.random.default_rng(augmentation_seed(seed, n, volume.case)))
        for n in range(1, augmentations + 1)
    ]
    _update_description(
        out_dir,
        _settings(geometry, all_views, seed),
        volume,
        {
            "patient": volume.patient,
            "source": volume.description,
            "credit": volume.credit,
            "augmentations": [None if a is None else a.to_dict() for a in augmentation_draws],
            **(case_details or {}),
        },
    )
    _prepare_index(out_dir)
    done = {row.key for row in load_index(out_dir)}
    total = len(augmentation_draws) * len(all_views)
    already = sum((volume.case, a, v) in done for a in range(len(augmentation_draws)) for v in range(len(all_views)))
    logger.info("case %s: %d of %d images already complete in %s", volume.case, already, total, out_dir)

    with (
        open(out_dir / INDEX_NAME, "a", encoding="utf-8") as index,
        tqdm(total=total, initial=already, disable=not progress, desc=volume.case, unit="img") as bar,
    ):

        def record(row: IndexRow) -> None:
            index.write(row.to_line())
            index.flush()
            os.fsync(index.fileno())
            bar.update(1)
            if on_image is not None:
                on_image(row)

        for number, augmentation in enumerate(augmentation_draws):
            rows = [
                IndexRow(
                    volume.patient,
                    volume.case,
                    number,
                    view_id,
                    azimuth,
                    elevation,
                    f"{IMAGES_DIR}/{volume.case}_{number:03d}_{view_id:04d}.png",
                )
                for view_id, (azimuth, elevation) in enumerate(all_views)
            ]
            missing = [row for row in rows if row.key not in done]
            # A killed run may have renamed an image into place without recording it.
            for row in [r for r in missing if _is_complete_png(out_dir / r.path, geometry)]:
                record(row)
                missing.remove(row)
            if not missing:
                continue
            source = volume if augmentation is None else apply_augmentation(volume, augmentation)
            renderer = DrrRenderer(source, geometry, device)
            for start in range(0, len(missing), batch_size):
                chunk = missing[start : start + batch_size]
                images = renderer([(r.azimuth, r.elevation) for r in chunk], batch_size=batch_size)
                for row, image in zip(chunk, images, strict=True):
                    pixels = image.numpy() if postprocess is None else postprocess(row.view_id, image.numpy())
                    _write_atomically(out_dir / row.path, _png_bytes(pixels))
                    record(row)
    return out_dir / INDEX_NAME
