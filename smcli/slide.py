"""Whole-slide images: find a bag's slide, read a thumbnail, paint patch footprints on it, cut patches.

Slides are read with OpenSlide (`pip install 'smcli[slide]'`: openslide-python and the openslide-bin
wheel, no system library), imported only inside these functions. Coordinates are level-0 pixels:
a patch at (x, y) with step s covers [x, x + s) × [y, y + s) of level 0.

Painting is vectorized: every patch's footprint is rasterized at thumbnail scale into one value
canvas with `np.maximum.at` (the hottest patch wins where footprints overlap), looping over the
pixel offsets of a footprint (a few dozen at 2000 px) — or, when footprints are larger than the
patch count, over the patches — never over both. Colour and blending are one lookup-table pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from smcli.errors import BagError, UsageError
from smcli.units import mpp_from_properties

MAX_SIDE_LIMIT = 20_000  # longest thumbnail side we agree to draw (a 20k x 20k RGB canvas is 1.2 GB)
READ_PIXELS = 32 * 1024 * 1024  # level pixels per read_region call (128 MB of RGBA)
MAX_OVERLAP = 64  # patches painted per canvas pixel, on average, before we call the step wrong
MAX_CROP_PIXELS = 4096 * 4096  # one top-patch crop at level 0
SLIDE_EXTRA = "reading slides needs OpenSlide: pip install 'smcli[slide]'"


def require_openslide():
    """The openslide module, or UsageError naming the extra to install."""
    try:
        import openslide
    except (ImportError, OSError):  # OSError: the package is there but its library is not
        raise UsageError(SLIDE_EXTRA) from None
    return openslide


def find_slide(slide: Path, bag_id: str) -> Path:
    """The slide for `bag_id`: `slide` itself when it is a file, else the file in that directory whose
    name is bag_id plus an extension (`slide_01.svs`, `slide_01.ome.tiff`). BagError when none is."""
    if not slide.is_dir():
        return slide
    matches = sorted(
        p
        for p in slide.iterdir()
        if p.name.startswith(f"{bag_id}.") and p.is_file() and _extension(p.name[len(bag_id) :])
    )
    if not matches:
        raise BagError(f"{slide}: no slide for bag {bag_id!r} (looked for {bag_id}.<extension>)")
    if len(matches) > 1:
        openslide = require_openslide()
        readable = [p for p in matches if openslide.OpenSlide.detect_format(str(p))]
        if len(readable) != 1:
            names = ", ".join(p.name for p in matches)
            raise BagError(f"{slide}: {len(matches)} slides match bag {bag_id!r} ({names}); keep one")
        return readable[0]
    return matches[0]


class SlideFinder:
    """`--slide` for a run of bags: a file is the slide of one bag (a second bag is that bag's
    error), a directory gives each bag its `<bag_id>.*` file (find_slide)."""

    def __init__(self, slide: Path) -> None:
        self.slide = slide
        self.used_by: str | None = None

    def __call__(self, bag_id: str, where: str) -> Path:
        if not self.slide.is_dir():
            if self.used_by is not None and self.used_by != bag_id:
                raise BagError(
                    f"{where}: --slide {self.slide} is the slide of {self.used_by}; "
                    "give a directory of slides to draw several bags"
                )
            self.used_by = bag_id
        return find_slide(self.slide, bag_id)


def _extension(rest: str) -> bool:
    """'.svs' or '.ome.tiff': one or two short alphanumeric suffixes, nothing else."""
    parts = rest.split(".")[1:]
    return 1 <= len(parts) <= 2 and all(0 < len(p) <= 5 and p.isalnum() for p in parts)


@dataclass
class Thumbnail:
    """The slide, or a box of it, at drawing scale: pixels (H, W, 3) uint8 showing the level-0
    region (x, y, width, height), on a slide of level0_size."""

    path: Path
    pixels: np.ndarray
    level0_size: tuple[int, int]  # (width, height) of the whole slide in level-0 pixels
    mpp: tuple[float, float] | None = None  # microns per level-0 pixel (x, y), when the slide says
    region: tuple[float, float, float, float] | None = None  # level-0 (x, y, w, h) shown; None: all

    @property
    def origin(self) -> tuple[float, float]:
        """Level-0 (x, y) of the thumbnail's top-left corner."""
        return (0.0, 0.0) if self.region is None else (self.region[0], self.region[1])

    @property
    def scale(self) -> tuple[float, float]:
        """(sx, sy): level-0 pixels per thumbnail pixel along x and y."""
        height, width = self.pixels.shape[:2]
        shown_w, shown_h = self.level0_size if self.region is None else self.region[2:]
        return shown_w / width, shown_h / height


def open_slide(path: Path):
    """An OpenSlide handle; BagError (one line, naming the file) when it is missing or unreadable."""
    openslide = require_openslide()
    if not path.exists():
        raise BagError(f"{path}: no such slide file")
    try:
        return openslide.OpenSlide(str(path))
    except (openslide.OpenSlideError, OSError, ValueError) as err:
        detail = str(err).strip().splitlines()[0][:120] if str(err).strip() else type(err).__name__
        raise BagError(f"{path}: cannot read as a slide ({detail})") from None


def thumbnail_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(w, h): the slide's aspect ratio with the longer side max_side px, never enlarged."""
    scale = min(max_side / width, max_side / height, 1.0)
    return max(1, round(width * scale)), max(1, round(height * scale))


def crop_box(
    coords: np.ndarray, side: tuple[float, float], level0_size: tuple[int, int]
) -> tuple[int, int, int, int]:
    """Level-0 (x0, y0, x1, y1): the patches' bounding box plus a margin (one patch side and 5 %
    of the box's longer side), clipped to the slide. coords (N, 2) level-0 patch corners."""
    low = coords.min(axis=0)  # (2,)
    high = coords.max(axis=0) + np.asarray(side)  # (2,)
    margin = np.asarray(side) + 0.05 * float((high - low).max())
    x0, y0 = np.maximum(np.floor(low - margin), 0).astype(int).tolist()
    x1, y1 = np.minimum(np.ceil(high + margin), level0_size).astype(int).tolist()
    return x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)


def read_thumbnail(path: Path, max_side: int, box: tuple[int, int, int, int] | None = None) -> Thumbnail:
    """The whole slide, or the level-0 box (x0, y0, x1, y1), with its longer side about `max_side`
    px (never enlarged).

    Reads the pyramid level just above that size in horizontal bands of at most READ_PIXELS
    (a slide without a pyramid costs time, not memory), shrinks each band by the whole factor
    that still leaves at least the target size (Pillow's box `reduce`), then resamples the
    result to the exact size (Lanczos). Unlike OpenSlide's `get_thumbnail`, which reads the whole
    level at once, a slide whose smallest level is huge does not need that level in memory.
    """
    if not 0 < max_side <= MAX_SIDE_LIMIT:
        raise UsageError(f"--max-side must be in 1..{MAX_SIDE_LIMIT}, got {max_side}")
    openslide = require_openslide()
    from PIL import Image

    with open_slide(path) as handle:
        mpp = mpp_from_properties(handle.properties)
        width, height = handle.dimensions
        if width < 1 or height < 1:
            raise BagError(f"{path}: the slide is empty ({width} x {height} pixels)")
        x0, y0, x1, y1 = (0, 0, width, height) if box is None else box
        size = thumbnail_size(x1 - x0, y1 - y0, max_side)
        level = handle.get_best_level_for_downsample(max((x1 - x0) / size[0], (y1 - y0) / size[1]))
        downsample = handle.level_downsamples[level]
        if box is None:
            level_w, level_h = handle.level_dimensions[level]
        else:  # the box at this level, at least the target size (never enlarged by rounding down)
            level_w = max(size[0], round((x1 - x0) / downsample))
            level_h = max(size[1], round((y1 - y0) / downsample))
        factor = max(1, min(level_w // size[0], level_h // size[1]))  # box-shrink by this first
        rows = max(factor, READ_PIXELS // level_w // factor * factor)  # band height, a multiple of it
        bands = []
        try:
            for top in range(0, level_h, rows):
                band_h = min(rows, level_h - top)
                region = handle.read_region((x0, y0 + round(top * downsample)), level, (level_w, band_h))
                band = _rgb_on_white(region)
                bands.append(np.asarray(band.reduce(factor) if factor > 1 else band))
        except (openslide.OpenSlideError, OSError, ValueError) as err:
            raise BagError(f"{path}: cannot read the slide's pixels ({str(err)[:120]})") from None
    image = Image.fromarray(np.concatenate(bands))
    if image.size != size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    shown = None if box is None else (float(x0), float(y0), level_w * downsample, level_h * downsample)
    return Thumbnail(path, np.asarray(image), (int(width), int(height)), mpp, shown)


def slide_mpp(path: Path) -> tuple[float, float] | None:
    """The slide's microns per level-0 pixel (x, y) from OpenSlide's properties, or None.

    BagError (one line) when the slide cannot be opened.
    """
    with open_slide(path) as handle:
        return mpp_from_properties(handle.properties)


def check_inside(coords: np.ndarray, level0_size: tuple[int, int], where: str, slide: Path) -> None:
    """BagError unless every patch corner lies on the slide's level 0 (a bag/slide mismatch)."""
    width, height = level0_size
    outside = (coords[:, 0] < 0) | (coords[:, 1] < 0) | (coords[:, 0] >= width) | (coords[:, 1] >= height)
    count = int(outside.sum())
    if count:
        far = coords.max(axis=0)
        raise BagError(
            f"{where}: {count} of {coords.shape[0]} patches lie outside slide {slide} "
            f"({width} x {height} px at level 0; coords reach x {far[0]:g}, y {far[1]:g}): "
            "wrong slide, or coords not in level-0 pixels?"
        )


def footprints(
    coords: np.ndarray, step: float | tuple[float, float], shape: tuple[int, int], scale: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Each patch's pixel box on a canvas of `shape` (H, W): x0, y0, x1, y1 (N,) int64, end exclusive.

    step: the patch side in level-0 pixels, or (side_x, side_y) when the slide's pixels are not square.

    Ends are rounded like starts, so patches that tile level 0 tile the canvas without gaps or
    overlaps; a patch narrower than a canvas pixel still gets one pixel.
    """
    height, width = shape
    sx, sy = scale
    step_x, step_y = step if isinstance(step, tuple) else (step, step)
    x = np.asarray(coords[:, 0], dtype=np.float64)
    y = np.asarray(coords[:, 1], dtype=np.float64)
    x0 = np.clip(np.floor(x / sx + 0.5), 0, width - 1).astype(np.int64)
    y0 = np.clip(np.floor(y / sy + 0.5), 0, height - 1).astype(np.int64)
    x1 = np.clip(np.floor((x + step_x) / sx + 0.5), 0, width).astype(np.int64)
    y1 = np.clip(np.floor((y + step_y) / sy + 0.5), 0, height).astype(np.int64)
    return x0, y0, np.maximum(x1, x0 + 1), np.maximum(y1, y0 + 1)


def paint(
    coords: np.ndarray,
    step: float | tuple[float, float],
    t: np.ndarray,
    shape: tuple[int, int],
    scale: tuple[float, float],
) -> np.ndarray:
    """(H, W) float32 canvas: t in [0, 1] of the hottest patch covering each pixel, -1 where none.

    coords: (N, 2) level-0 (x, y); t: (N,); scale: level-0 pixels per canvas pixel (sx, sy).
    """
    height, width = shape
    canvas = np.full(height * width, -1.0, dtype=np.float32)
    if coords.shape[0] == 0:
        return canvas.reshape(height, width)
    x0, y0, x1, y1 = footprints(coords, step, shape, scale)
    values = np.asarray(t, dtype=np.float32)
    box_w, box_h = x1 - x0, y1 - y0
    painted = int(np.sum(box_w * box_h))
    if painted > MAX_OVERLAP * height * width:  # work and memory would grow with the overlap, not the input
        side = step[0] if isinstance(step, tuple) else step
        raise BagError(
            f"patch footprints of {side:g} px cover the canvas {painted / (height * width):.0f} times over: "
            "the patch step is far larger than the spacing of the coords; check --patch-size"
        )
    most_w, most_h = int(box_w.max()), int(box_h.max())
    if most_w * most_h <= coords.shape[0]:
        # the usual case: a few dozen offsets, each one vectorized over all patches; offsets inside
        # every box (the smallest box) need no mask, the fringe of larger boxes does
        least_w, least_h = int(box_w.min()), int(box_h.min())
        base = y0 * width + x0  # (N,) flat index of each box's corner
        for dy in range(most_h):
            for dx in range(most_w):
                if dy < least_h and dx < least_w:
                    np.maximum.at(canvas, base + (dy * width + dx), values)
                    continue
                chosen = (dy < box_h) & (dx < box_w)
                np.maximum.at(canvas, base[chosen] + (dy * width + dx), values[chosen])
    else:
        # few patches, large footprints: one slice per patch, each vectorized over its pixels
        grid = canvas.reshape(height, width)
        for i in np.argsort(values, kind="stable"):  # hottest last, so it wins
            box = grid[y0[i] : y1[i], x0[i] : x1[i]]
            np.maximum(box, values[i], out=box)
    return canvas.reshape(height, width)


def blend(pixels: np.ndarray, canvas: np.ndarray, lut: np.ndarray, alpha: float | np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8: rint((1 - a) * slide + a * lut colour) where canvas >= 0, else the slide.

    pixels: (H, W, 3) uint8; canvas: (H, W) from `paint`; lut: (L, 3) uint8 colours for t = 0..1;
    alpha: one opacity a for every colour, or (L,) opacities, one per colour level (see
    `opacity_ramp`). Every (slide value, colour level) pair is mixed once into a (256, L + 1) table
    per channel, the extra column meaning "no patch: keep the slide", so the frame is one gather
    per channel.
    """
    levels = lut.shape[0]
    code = np.where(canvas >= 0, np.rint(canvas * (levels - 1)), levels).astype(np.intp)  # (H, W)
    slide_values = np.arange(256, dtype=np.float64)[:, None]  # (256, 1)
    opacity = np.broadcast_to(np.asarray(alpha, dtype=np.float64), (levels,))[None, :]  # (1, L)
    out = np.empty_like(pixels)
    for channel in range(3):
        table = np.empty((256, levels + 1), dtype=np.uint8)
        mixed = (1.0 - opacity) * slide_values + opacity * lut[None, :, channel].astype(np.float64)
        table[:, :levels] = np.clip(np.rint(mixed), 0, 255)
        table[:, levels] = np.arange(256)
        flat = pixels[..., channel].astype(np.intp) * (levels + 1) + code  # (H, W)
        out[..., channel] = table.reshape(-1)[flat]
    return out


def opacity_ramp(levels: int, low: float, high: float) -> np.ndarray:
    """(levels,) opacities rising linearly from `low` (t = 0) to `high` (t = 1): low attention lets
    the tissue through, high attention covers it, so the hottest colour is the most visible thing
    whatever the stain under it (a fixed alpha mixes a pale top colour with dark tissue into grey)."""
    return np.linspace(low, high, levels)


def border(region: np.ndarray, width: int) -> np.ndarray:
    """(H, W) bool: the pixels of `region` (H, W) bool within `width` px of its edge (inside), by
    erosion with a (2w+1) cross, one shift at a time (no image library needed for a boolean mask)."""
    padded = np.pad(region, width, constant_values=False)
    inner = region.copy()
    height, span = region.shape
    for d in range(1, width + 1):
        inner &= padded[width - d : width - d + height, width : width + span]
        inner &= padded[width + d : width + d + height, width : width + span]
        inner &= padded[width : width + height, width - d : width - d + span]
        inner &= padded[width : width + height, width + d : width + d + span]
    return region & ~inner


def read_patches(path: Path, coords: np.ndarray, size: int) -> list[np.ndarray]:
    """Level-0 crops (size, size, 3) uint8 at each (x, y) of coords (K, 2); outside the slide is white."""
    if size * size > MAX_CROP_PIXELS:
        raise UsageError(f"{path}: patches of {size} px are too large to cut (at most 4096)")
    openslide = require_openslide()
    crops = []
    with open_slide(path) as handle:
        for x, y in np.asarray(coords, dtype=np.float64):
            try:
                region = handle.read_region((int(x), int(y)), 0, (size, size))
            except (openslide.OpenSlideError, OSError, ValueError) as err:
                raise BagError(f"{path}: cannot read a patch at ({x:g}, {y:g}) ({str(err)[:120]})") from None
            crops.append(_on_white(np.asarray(region)))
    return crops


def _rgb_on_white(region):
    """A PIL RGBA region from OpenSlide -> RGB over white, in Pillow (no numpy round trip)."""
    from PIL import Image

    if region.getchannel("A").getextrema()[0] == 255:  # the usual case: every pixel scanned
        return region.convert("RGB")
    white = Image.new("RGB", region.size, (255, 255, 255))
    white.paste(region, mask=region)
    return white


def _on_white(rgba: np.ndarray) -> np.ndarray:
    """(H, W, 4) RGBA from OpenSlide (not premultiplied) -> (H, W, 3) RGB over white."""
    if rgba[..., 3].min() == 255:  # the usual case: every pixel scanned, nothing to composite
        return np.ascontiguousarray(rgba[..., :3])
    alpha = rgba[..., 3:4].astype(np.float32) / 255.0
    rgb = rgba[..., :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
    return np.rint(rgb).astype(np.uint8)
