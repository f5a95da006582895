"""Grids of image tiles (training views, nearest neighbours) drawn with PIL.

Layout, for R rows and K columns of square cells of side S: a header band of ``HEADER`` px with
the column titles, then the rows, with a ``GAP`` px margin around every cell, so the image is
``K·(S + GAP) + GAP`` wide and ``HEADER + R·(S + GAP) + GAP`` high.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

GAP = 4  # px between cells; a coloured border is drawn inside it
HEADER = 24  # px for the column titles
MIN_CELL = 96  # small images are scaled up by a whole factor to at least this side


def cell_size(image_size: int) -> int:
    """The side of a cell for images of ``image_size`` px: a whole multiple, at least
    ``MIN_CELL`` (a 16-px digit is shown 6× larger, nearest-neighbour)."""
    return image_size * max(1, math.ceil(MIN_CELL / image_size))


def grid_shape(rows: int, columns: int, cell: int) -> tuple[int, int]:
    """(width, height) in pixels of a grid (see the module docstring)."""
    return columns * (cell + GAP) + GAP, HEADER + rows * (cell + GAP) + GAP


def to_hwc_uint8(image: np.ndarray) -> np.ndarray:
    """(C, H, W) or (H, W) uint8 → (H, W, 3) uint8."""
    if image.ndim == 2:
        image = image[None]
    if image.shape[0] not in (1, 3):
        raise ValueError(f"an image tile needs 1 or 3 channels, got shape {image.shape}")
    hwc = np.ascontiguousarray(np.transpose(image, (1, 2, 0)))
    return np.repeat(hwc, 3, axis=2) if hwc.shape[2] == 1 else hwc


def _fit(image: np.ndarray, cell: int) -> Image.Image:
    """The (H, W, 3) image in a cell×cell square: scaled by a whole factor (nearest) where it is
    small, else shrunk to fit (bicubic), centred on black."""
    tile = Image.fromarray(image)
    w, h = tile.size
    factor = cell / max(w, h)
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    resample = Image.Resampling.NEAREST if factor >= 1 else Image.Resampling.BICUBIC
    tile = tile.resize(size, resample)
    square = Image.new("RGB", (cell, cell))
    square.paste(tile, ((cell - size[0]) // 2, (cell - size[1]) // 2))
    return square


def tile_grid(
    rows: Sequence[Sequence[np.ndarray]],
    titles: Sequence[str],
    cell: int,
    borders: Sequence[Sequence[str | None]] | None = None,
) -> Image.Image:
    """Draw ``rows`` of (H, W, 3) uint8 images, ``titles`` over the columns; ``borders`` (same
    shape as ``rows``) colours a frame around a cell (None: none)."""
    columns = max((len(r) for r in rows), default=0)
    if len(titles) != columns:
        raise ValueError(f"{len(titles)} titles for {columns} columns")
    canvas = Image.new("RGB", grid_shape(len(rows), columns, cell), "white")
    draw = ImageDraw.Draw(canvas)
    for j, title in enumerate(titles):
        x = GAP + j * (cell + GAP)
        draw.text((x + 2, 6), title, fill="black")
    for i, row in enumerate(rows):
        y = HEADER + GAP + i * (cell + GAP)
        for j, image in enumerate(row):
            x = GAP + j * (cell + GAP)
            colour = borders[i][j] if borders is not None else None
            if colour is not None:
                half = GAP // 2
                draw.rectangle(
                    (x - half, y - half, x + cell + half - 1, y + cell + half - 1), fill=colour
                )
            canvas.paste(_fit(image, cell), (x, y))
    return canvas


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()
