"""Deep Zoom tiles: the pyramid geometry shared by every layer, slide tiles, and a bounded cache.

The geometry is Deep Zoom's (as OpenSlide's DeepZoomGenerator and OpenSeadragon compute it):
level `max_level = ceil(log2(max(width, height)))` is the image at full size, each level below
halves it (rounding up) down to 1 × 1 at level 0, and tiles are `TILE` pixels square with no
overlap (edge tiles are smaller). A pixel of level L stands for 2^(max_level − L) image pixels, so
the attention tiles (smcli.view.attention) land exactly on the slide tiles at every zoom.
"""

from __future__ import annotations

import io
import math
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TILE = 256
CACHE_BYTES = 96 * 1024 * 1024  # encoded tiles kept in memory, all layers and bags together
JPEG_QUALITY = 85
CHECKER = ((236, 236, 236), (206, 206, 206))  # "no patch" on the grid image, as in heatmap's PNG
CHECKER_SQUARE = 8


class NoSuchTile(LookupError):
    """A level, column or row outside the pyramid: the server answers 404."""


@dataclass(frozen=True)
class Pyramid:
    """Deep Zoom geometry of a width × height image."""

    width: int
    height: int
    tile: int = TILE

    @property
    def max_level(self) -> int:
        return max(0, math.ceil(math.log2(max(self.width, self.height))))

    def downsample(self, level: int) -> int:
        """Image pixels per pixel of `level`."""
        return 2 ** (self.max_level - level)

    def level_size(self, level: int) -> tuple[int, int]:
        factor = self.downsample(level)
        return -(-self.width // factor), -(-self.height // factor)

    def tile_box(self, level: int, col: int, row: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of the tile in `level` pixels, end exclusive; NoSuchTile outside."""
        if not 0 <= level <= self.max_level:
            raise NoSuchTile(f"level {level}")
        width, height = self.level_size(level)
        x0, y0 = col * self.tile, row * self.tile
        if col < 0 or row < 0 or x0 >= width or y0 >= height:
            raise NoSuchTile(f"tile {col}_{row} of level {level}")
        return x0, y0, min(x0 + self.tile, width), min(y0 + self.tile, height)


class TileCache:
    """Encoded tiles (bytes) by key, least recently used first out, at most `limit` bytes in all."""

    def __init__(self, limit: int = CACHE_BYTES) -> None:
        self.limit = limit
        self.size = 0
        self._items: OrderedDict[tuple, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get_or_make(self, key: tuple, make: Callable[[], bytes]) -> bytes:
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
                return found
        made = make()  # outside the lock: other threads keep serving while this one renders
        with self._lock:
            if key not in self._items and len(made) <= self.limit:
                self._items[key] = made
                self.size += len(made)
                while self.size > self.limit:
                    _, dropped = self._items.popitem(last=False)
                    self.size -= len(dropped)
        return made

    def __len__(self) -> int:
        return len(self._items)


class SlideTiles:
    """JPEG tiles of one slide from OpenSlide's DeepZoomGenerator, on the Pyramid grid.

    limit_bounds=False keeps level-0 pixel (0, 0) at the image's corner, so patch coords need no
    shift. One OpenSlide handle serves every thread (OpenSlide reads are thread-safe).
    """

    def __init__(self, path: Path) -> None:
        from openslide.deepzoom import DeepZoomGenerator

        from smcli.slide import open_slide

        self.path = path
        self.handle = open_slide(path)
        self.generator = DeepZoomGenerator(self.handle, tile_size=TILE, overlap=0, limit_bounds=False)
        width, height = self.handle.dimensions
        self.pyramid = Pyramid(int(width), int(height))
        if self.generator.level_count != self.pyramid.max_level + 1:  # never expected; guards the grid
            raise RuntimeError(f"{path}: Deep Zoom levels {self.generator.level_count} != {self.pyramid}")

    def jpeg(self, level: int, col: int, row: int) -> bytes:
        self.pyramid.tile_box(level, col, row)  # NoSuchTile outside
        image = self.generator.get_tile(level, (col, row))  # PIL RGB
        return encode_jpeg(image)

    def region(self, x: int, y: int, size: int, out: int) -> bytes:
        """JPEG of the level-0 square [x, x + size)², shrunk to `out` px (a patch thumbnail)."""
        from PIL import Image

        from smcli.slide import _rgb_on_white

        level = self.handle.get_best_level_for_downsample(size / out)
        downsample = self.handle.level_downsamples[level]
        read = max(1, round(size / downsample))
        region = _rgb_on_white(self.handle.read_region((x, y), level, (read, read)))
        return encode_jpeg(region.resize((out, out), Image.Resampling.BILINEAR))

    def close(self) -> None:
        self.handle.close()


def encode_jpeg(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def encode_png(pixels: np.ndarray) -> bytes:
    """(H, W, 3 or 4) uint8 -> PNG bytes; fast zlib level: tiles are made on request, not archived."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def checker_png(width: int, height: int) -> bytes:
    """The grid image's background tile: the grey checkerboard that means "no patch"."""
    rows = (np.arange(height) // CHECKER_SQUARE)[:, None]
    cols = (np.arange(width) // CHECKER_SQUARE)[None, :]
    return encode_png(np.asarray(CHECKER, dtype=np.uint8)[(rows + cols) % 2])
