"""PNG renderings of a synthesis result for people: one image per view and a labelled contact sheet.

Display only: the 12-bit restored views are windowed to 8 bits with each view's own window.
Every sheet carries the word SYNTHETIC so a PNG passed around never looks like an acquired film.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

LABEL_HEIGHT = 18
BANNER = "SYNTHETIC VIEWS - not acquired, not for diagnosis"


def windowed_8bit(pixels: np.ndarray, center: float, width: float) -> np.ndarray:
    """Linear window (PS3.3 C.11.2.1.2 in spirit) to 0..255."""
    lo = center - width / 2
    scaled = (pixels.astype(np.float32) - lo) / max(width, 1.0)
    return (np.clip(scaled, 0, 1) * 255 + 0.5).astype(np.uint8)


def save_png(pixels8: np.ndarray, path: Path) -> None:
    Image.fromarray(pixels8, mode="L").save(path)


def contact_sheet(tiles: Sequence[np.ndarray], labels: Sequence[str], columns: int = 4) -> Image.Image:
    """Tiles (8-bit, same shape) in a grid, each with its label under it, and a banner on top."""
    if not tiles or len(tiles) != len(labels):
        raise ValueError(f"need one label per tile, got {len(tiles)} tiles and {len(labels)} labels")
    h, w = tiles[0].shape
    columns = max(1, min(columns, len(tiles)))
    rows = (len(tiles) + columns - 1) // columns
    sheet = Image.new("L", (columns * w, LABEL_HEIGHT + rows * (h + LABEL_HEIGHT)), color=0)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    draw.text((4, 3), BANNER, fill=255, font=font)
    for i, (tile, label) in enumerate(zip(tiles, labels, strict=True)):
        x, y = (i % columns) * w, LABEL_HEIGHT + (i // columns) * (h + LABEL_HEIGHT)
        sheet.paste(Image.fromarray(tile, mode="L"), (x, y))
        draw.text((x + 4, y + h + 3), label, fill=255, font=font)
    return sheet
