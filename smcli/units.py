"""Coordinate units: a bag's patch corners, in whatever unit they were stored, as level-0 pixels.

Bags count their coords in one of two units (smcli.readers.COORDS_UNITS):

- level-0 pixels: TRIDENT and CLAM h5, smcli's own safetensors bags;
- micrometres: STAMP h5 (`tile_size_um`), and a safetensors bag whose metadata says
  `coords_units: "micrometres"` (what `smcli convert-bag` writes for a STAMP source).

Scoring works in either (the graph only needs coords and step in the same unit), and so does the
patch-grid picture. Everything placed on a slide needs level-0 pixels: the overlay, its crop, the
top patches, GeoJSON and the viewer. A micrometre coordinate becomes a pixel by dividing by the
slide's microns per pixel (OpenSlide's `openslide.mpp-x` / `openslide.mpp-y`), or by `--mpp`, which
overrides the slide. With neither, `to_level0` raises a BagError naming `--mpp`: never a picture at
a guessed scale.

Score tables carry the unit (see smcli.scored.table_units): parquet key-value metadata
`smcli.coords_units`, and a `coords_units` column in the bags file beside every table
(`_bags.csv`, `<stem>_bags.csv`). A table that says nothing is in level-0 pixels.

A consumer (heatmap, geojson, view) does, per bag:

    mpp = resolve_mpp(flag_mpp, mpp_from_properties(slide.properties), slide_name)   # or no slide
    placed = to_level0(coords, patch_step, units, mpp, where="table.csv: slide_01")
    placed.coords      # (N, 2) float64 level-0 (x, y) of each patch's corner
    placed.patch_side  # (side_x, side_y) level-0 pixels
    placed.note        # one line for a `note:` (the MPP used and where it came from), or ""

Pure functions: nothing here opens a file (smcli.slide.slide_mpp reads a slide's properties).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from smcli.errors import BagError, UsageError

PIXELS = "level-0 pixels"
MICROMETRES = "micrometres"
UNITS = (PIXELS, MICROMETRES)

_SPELLINGS = {  # what a file may say -> the one name smcli uses (compared lower-case, trimmed)
    "level-0 pixels": PIXELS,
    "level0 pixels": PIXELS,
    "level-0 pixel": PIXELS,
    "pixels": PIXELS,
    "pixel": PIXELS,
    "px": PIXELS,
    "micrometres": MICROMETRES,
    "micrometers": MICROMETRES,
    "micrometre": MICROMETRES,
    "micrometer": MICROMETRES,
    "microns": MICROMETRES,
    "micron": MICROMETRES,
    "um": MICROMETRES,
    "µm": MICROMETRES,  # MICRO SIGN
    "μm": MICROMETRES,  # GREEK SMALL LETTER MU
}
SHORT = {PIXELS: "px", MICROMETRES: "µm"}  # for captions: "step 256 µm"


def parse_units(text: object, where: str = "") -> str:
    """A stored unit name -> PIXELS or MICROMETRES; empty or missing (None, NaN) -> PIXELS.

    Any other text is a BagError (`where` names the file): a unit smcli does not know could be
    anything, and drawing it as pixels would put the picture at a wrong scale.
    """
    if text is None or (isinstance(text, float) and math.isnan(text)):
        return PIXELS
    name = str(text).strip().lower()
    if not name:
        return PIXELS
    if name in _SPELLINGS:
        return _SPELLINGS[name]
    prefix = f"{where}: " if where else ""
    raise BagError(
        f"{prefix}coords_units {str(text)[:40]!r} is not a unit smcli knows ({PIXELS} or {MICROMETRES})"
    )


@dataclass(frozen=True)
class Mpp:
    """Microns per level-0 pixel along x and y, and where they came from ("--mpp" or the slide)."""

    x: float
    y: float
    source: str

    def describe(self) -> str:
        value = f"{self.x:g}" if self.x == self.y else f"{self.x:g} x {self.y:g}"
        return f"{value} µm/px ({self.source})"


def positive_number(value: object) -> float | None:
    """A finite number > 0 from a property string or number; None for anything else."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return None
    return number if math.isfinite(number) and number > 0 else None


def mpp_from_properties(properties: Mapping[str, str]) -> tuple[float, float] | None:
    """(mpp_x, mpp_y) from an OpenSlide property map (`openslide.mpp-x`, `openslide.mpp-y`).

    One of the two alone stands for both (square pixels); absent, zero or not a number: None.
    """
    mpp_x = positive_number(properties.get("openslide.mpp-x"))
    mpp_y = positive_number(properties.get("openslide.mpp-y"))
    if mpp_x is None and mpp_y is None:
        return None
    return (mpp_x or mpp_y, mpp_y or mpp_x)  # type: ignore[return-value]


def check_mpp_flag(value: float | None) -> None:
    """UsageError unless `--mpp` is absent or a positive, finite number (µm per level-0 pixel)."""
    if value is not None and positive_number(value) is None:
        raise UsageError(f"--mpp must be a positive number of micrometres per level-0 pixel, got {value}")


def resolve_mpp(
    flag: float | None, slide_mpp: tuple[float, float] | None, slide_name: str = ""
) -> Mpp | None:
    """The MPP to use: `--mpp` (the same along x and y) over the slide's own; None when neither."""
    if flag is not None:
        check_mpp_flag(flag)
        return Mpp(float(flag), float(flag), "--mpp")
    if slide_mpp is not None:
        where = f"{slide_name} openslide.mpp-x/y" if slide_name else "the slide's openslide.mpp-x/y"
        return Mpp(float(slide_mpp[0]), float(slide_mpp[1]), where)
    return None


@dataclass(frozen=True)
class Level0:
    """Patches placed on level 0: corners (N, 2) float64 (x, y) in level-0 pixels, the patch side
    (x, y) in level-0 pixels, and the MPP used (None when the coords were pixels already)."""

    coords: np.ndarray
    patch_side: tuple[float, float]
    mpp: Mpp | None = None

    @property
    def note(self) -> str:
        """'micrometres -> level-0 pixels at 0.5 µm/px (--mpp)', or '' when nothing was converted."""
        if self.mpp is None:
            return ""
        return f"coords in micrometres drawn at {self.mpp.describe()}"


def to_level0(
    coords: np.ndarray, patch_step: float, units: str, mpp: Mpp | None, where: str, hint: str = ""
) -> Level0:
    """coords (N, 2) and patch_step in `units` -> a Level0 in level-0 pixels.

    PIXELS pass through (as float64). MICROMETRES are divided by the MPP per axis:
    x_px = x_um / mpp_x, y_px = y_um / mpp_y, side = step_um / mpp. Without an MPP: BagError
    "<where>: coords are in micrometres and <hint or 'no slide gives the scale'>: pass --mpp ...".
    """
    coords = np.asarray(coords, dtype=np.float64)
    if units == PIXELS:
        return Level0(coords, (float(patch_step), float(patch_step)))
    if units != MICROMETRES:
        raise BagError(
            f"{where}: coords_units {units!r} is not a unit smcli knows ({PIXELS} or {MICROMETRES})"
        )
    if mpp is None:
        reason = hint or "no slide gives the scale"
        raise BagError(
            f"{where}: coords are in micrometres and {reason}: pass --mpp "
            "(micrometres per level-0 pixel of the slide)"
        )
    scale = np.array([mpp.x, mpp.y], dtype=np.float64)
    return Level0(coords / scale, (float(patch_step) / mpp.x, float(patch_step) / mpp.y), mpp)
