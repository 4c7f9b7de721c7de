"""Attention tiles: every patch's true footprint, coloured, on the Deep Zoom grid (RGBA PNG).

Why server-side tiles rather than rectangles drawn in the page: the page then holds no per-patch
data at all (100k patches would be megabytes of JSON and a canvas redraw of 100k rectangles on
every animation frame of a pan), each tile costs the same whatever the bag size, the tiles are
cached like the slide's, and the footprints are rasterized by the same code as `heatmap`'s slide
overlay (smcli.slide.paint: the hottest patch wins where footprints overlap), so the viewer and
the PNG agree pixel for pixel in placement. Opacity is the page's (a layer opacity, no refetch);
colour map, scale, outlines and fade (alpha growing with the value, so the highest attention
stays the most visible thing on any stain) are part of the tile's URL and cache key.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from smcli.errors import BagError
from smcli.view.data import ViewBag
from smcli.view.tiles import Pyramid, encode_png

OUTLINE = (0, 214, 255, 255)  # cyan, as heatmap's label outline
OUTLINE_WIDTH = 2  # pixels at every zoom: the border of label-1 patches stays visible
FADE_FLOOR = 0.15 / 0.9  # with fade at the page's 90 %: 0.15 at the bottom to 0.9 at the top, as heatmap


@dataclass(frozen=True)
class Style:
    """How to colour: a colour map's lookup table (L, 3) uint8, the scale, and label outlines."""

    cmap: str
    lut: np.ndarray
    scale: str = "rank"
    vmin: float | None = None
    vmax: float | None = None
    labels: bool = False
    fade: bool = False  # alpha grows with the value: low attention lets the tissue through

    @property
    def key(self) -> tuple:
        return (self.cmap, self.scale, self.vmin, self.vmax, self.labels, self.fade)


def tile_region(bag: ViewBag, pyramid: Pyramid, level: int, col: int, row: int, pad: int = 0):
    """The tile's level-0 corner (X0, Y0), its size in level pixels (w, h), and level-0 per pixel."""
    x0, y0, x1, y1 = pyramid.tile_box(level, col, row)
    factor = float(pyramid.downsample(level))
    corner = (bag.origin[0] + (x0 - pad) * factor, bag.origin[1] + (y0 - pad) * factor)
    return corner, (x1 - x0 + 2 * pad, y1 - y0 + 2 * pad), factor


def select(
    coords: np.ndarray, side: tuple[float, float], corner: tuple[float, float], span: tuple[float, float]
) -> np.ndarray:
    """Indices of the patches whose footprint meets the level-0 box [corner, corner + span).

    A full scan: four comparisons over (N,) cost well under a millisecond at 100k patches, less
    than keeping a spatial index in step with every scale.
    """
    x, y = coords[:, 0], coords[:, 1]
    inside = (
        (x < corner[0] + span[0])
        & (x + side[0] > corner[0])
        & (y < corner[1] + span[1])
        & (y + side[1] > corner[1])
    )
    return np.flatnonzero(inside)


def paint_tile(
    coords: np.ndarray, side: tuple[float, float], t: np.ndarray, shape: tuple[int, int], factor: float
) -> np.ndarray:
    """(h, w) float32: t of the hottest patch over each pixel, -1 where none. coords relative to
    the tile's corner, in level-0 pixels; `factor` level-0 pixels per tile pixel."""
    from smcli.slide import paint

    try:
        return paint(coords, side, t, shape, (factor, factor))
    except BagError:
        # far zoomed out, thousands of sub-pixel patches share each pixel: one pixel per patch
        height, width = shape
        canvas = np.full(height * width, -1.0, dtype=np.float32)
        column = np.clip(np.floor(coords[:, 0] / factor + 0.5), 0, width - 1).astype(np.intp)
        line = np.clip(np.floor(coords[:, 1] / factor + 0.5), 0, height - 1).astype(np.intp)
        np.maximum.at(canvas, line * width + column, t.astype(np.float32))
        return canvas.reshape(height, width)


def render(bag: ViewBag, pyramid: Pyramid, level: int, col: int, row: int, style: Style) -> bytes:
    """The attention tile (level, col, row) of `bag` as RGBA PNG: colour where a patch is, clear elsewhere."""
    corner, (width, height), factor = tile_region(bag, pyramid, level, col, row)
    chosen = select(bag.coords, bag.side, corner, (width * factor, height * factor))
    pixels = np.zeros((height, width, 4), dtype=np.uint8)  # (h, w, RGBA), transparent
    if chosen.size:
        t = bag.scaled(style.scale, style.vmin, style.vmax)[chosen]  # (K,)
        local = bag.coords[chosen] - np.asarray(corner)  # (K, 2)
        canvas = paint_tile(local, bag.side, t, (height, width), factor)
        painted = canvas >= 0
        index = np.rint(canvas[painted] * (style.lut.shape[0] - 1)).astype(np.intp)
        pixels[painted, :3] = style.lut[index]
        if style.fade:  # FADE_FLOOR at the bottom of the scale, opaque at the top
            value = canvas[painted]  # (P,) in [0, 1]
            pixels[painted, 3] = np.rint(255 * (FADE_FLOOR + (1 - FADE_FLOOR) * value)).astype(np.uint8)
        else:
            pixels[painted, 3] = 255
    if style.labels and bag.bag.labels is not None:
        pixels[outline(bag, pyramid, level, col, row)] = OUTLINE
    return encode_png(pixels)


def outline(bag: ViewBag, pyramid: Pyramid, level: int, col: int, row: int) -> np.ndarray:
    """(h, w) bool: the inner border of the label-1 region on this tile. The region is painted
    OUTLINE_WIDTH pixels beyond the tile on every side, so tile edges draw no false borders."""
    pad = OUTLINE_WIDTH
    corner, (width, height), factor = tile_region(bag, pyramid, level, col, row, pad)
    labelled = np.flatnonzero(np.asarray(bag.bag.labels, dtype=bool))
    region = np.zeros((height, width), dtype=bool)
    if labelled.size:
        coords = bag.coords[labelled]
        chosen = select(coords, bag.side, corner, (width * factor, height * factor))
        if chosen.size:
            local = coords[chosen] - np.asarray(corner)
            ones = np.ones(chosen.shape[0], dtype=np.float32)
            region = paint_tile(local, bag.side, ones, (height, width), factor) >= 0
    inner = region.copy()
    for d in range(1, pad + 1):  # erosion by a cross, one shift at a time
        inner[d:, :] &= region[:-d, :]
        inner[:-d, :] &= region[d:, :]
        inner[:, d:] &= region[:, :-d]
        inner[:, :-d] &= region[:, d:]
    border = region & ~inner
    return border[pad:-pad, pad:-pad]
