"""PNG renderings of a synthesis result for people: one image per view and a labelled contact sheet.

Display only: the 12-bit restored views are windowed to 8 bits with each view's own window.
Every sheet carries the word SYNTHETIC so a PNG passed around never looks like an acquired film.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

LABEL_HEIGHT = 30  # two lines of the default font
MIN_TILE = 192  # tiles narrower than this are enlarged on the sheet (display only) so labels fit
BANNER = "SYNTHETIC VIEWS - not acquired, not for diagnosis"


def windowed_8bit(pixels: np.ndarray, center: float, width: float) -> np.ndarray:
    """Linear window (PS3.3 C.11.2.1.2 in spirit) to 0..255."""
    lo = center - width / 2
    scaled = (pixels.astype(np.float32) - lo) / max(width, 1.0)
    return (np.clip(scaled, 0, 1) * 255 + 0.5).astype(np.uint8)


def save_png(pixels8: np.ndarray, path: Path) -> None:
    Image.fromarray(pixels8, mode="L").save(path)


def contact_sheet(tiles: Sequence[np.ndarray], labels: Sequence[str], columns: int = 4) -> Image.Image:
    """Tiles (8-bit, same shape) in a grid, each with its label under it, and a banner on top.

    A label may hold a newline. Small tiles are enlarged by an integer factor for display (the PNGs
    of the views themselves stay at model scale).
    """
    if not tiles or len(tiles) != len(labels):
        raise ValueError(f"need one label per tile, got {len(tiles)} tiles and {len(labels)} labels")
    h0, w0 = tiles[0].shape
    zoom = max(1, -(-MIN_TILE // w0))
    h, w = h0 * zoom, w0 * zoom
    columns = max(1, min(columns, len(tiles)))
    rows = (len(tiles) + columns - 1) // columns
    sheet = Image.new("L", (columns * w, LABEL_HEIGHT + rows * (h + LABEL_HEIGHT)), color=0)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    draw.text((4, 3), BANNER, fill=255, font=font)
    for i, (tile, label) in enumerate(zip(tiles, labels, strict=True)):
        x, y = (i % columns) * w, LABEL_HEIGHT + (i // columns) * (h + LABEL_HEIGHT)
        sheet.paste(Image.fromarray(tile, mode="L").resize((w, h), Image.Resampling.BICUBIC), (x, y))
        draw.multiline_text((x + 4, y + h + 2), label, fill=255, font=font, spacing=2)
    return sheet
