"""Thumbnails of stored instances: rendered on the server with the image's own window, cached on disk.

Pixels go through :func:`synthesis.radiograph.display_pixels` (decode, Modality LUT, first VOI
window or LUT, MONOCHROME1 inversion; numpy and pydicom only, no torch), are scaled to fit
``size`` pixels and written as PNG under ``<storage_dir>/console-cache/thumbnails``. The cache key
is the instance's SHA-256 and the size, so a file never shows a stale picture.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from storage.store import InstanceStore

logger = logging.getLogger(__name__)

DEFAULT_SIZE = 256
MAX_SIZE = 1024


def cache_dir(storage_dir: Path) -> Path:
    return storage_dir / "console-cache" / "thumbnails"


def thumbnail(store: InstanceStore, folder: Path, path: str, sha256: str, size: int = DEFAULT_SIZE) -> Path:
    """The PNG thumbnail of the stored file ``path`` (rendered once, then read from ``folder``)."""
    from synthesis.radiograph import display_pixels  # numpy + pydicom only

    size = max(16, min(int(size), MAX_SIZE))
    target = folder / sha256[:2] / f"{sha256}-{size}.png"
    if target.is_file():
        return target
    ds = store.open_dataset(path)
    pixels = display_pixels(ds)
    image = Image.fromarray(np.round(pixels * 255.0).astype(np.uint8), mode="L")
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    logger.debug("thumbnail %s rendered at %d px", target.name, size)
    return target
