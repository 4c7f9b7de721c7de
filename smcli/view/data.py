"""The bags `smcli view` shows: read once at start-up, then only looked up.

Inputs are what `heatmap` takes (smcli.scored: score tables, or bags scored on the spot with -m),
so the numbers shown are those of the table. Each bag gets the image it is drawn on: its slide
(level-0 pixels, origin 0) when `--slide` finds one, else the patch grid itself (the bounding box
of the patches, origin at the smallest x, y).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from smcli.bags import BagKeys
from smcli.errors import BagError, UsageError
from smcli.scored import BagValues, Failed, ValuesRequest, iter_values

SCALES = ("rank", "minmax", "raw", "log")  # as heatmap's --norm


@dataclass(frozen=True)
class ViewRequest:
    """What to show: INPUT... as `heatmap` takes them, and where the slides are."""

    inputs: list[Path]
    model: Path | None = None
    slide: Path | None = None
    column: str = "attention_logit"
    patch_size: float | None = None
    dist_thr: float | None = None
    keys: BagKeys = BagKeys()
    mpp: float | None = None  # µm per level-0 pixel for micrometre coords; overrides the slide's


@dataclass
class ViewBag:
    """One bag as the viewer serves it. Arrays are (N,) over the bag's finite patches, table order.

    coords: (N, 2) image-space (x, y) of each patch's corner — level-0 pixels on a slide (micrometre
    tables converted with the MPP), the table's own unit on the patch grid; a patch covers
    [x, x + side_x) × [y, y + side_y). The image is `size` (width, height) pixels whose pixel
    (0, 0) is the point `origin`. `bag.coords` keeps the table's own x, y, which the page shows.
    """

    index: int
    bag: BagValues
    coords: np.ndarray  # (N, 2) float64
    values: np.ndarray  # (N,) the drawn column
    side: tuple[float, float]
    origin: tuple[float, float]
    size: tuple[int, int]
    slide: Path | None = None
    percentile: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (N,) in [0, 100]
    order: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.intp))  # highest first
    notes: list[str] = field(default_factory=list)
    _scales: dict = field(default_factory=dict)

    @property
    def bag_id(self) -> str:
        return self.bag.bag_id

    def scaled(self, scale: str, vmin: float | None = None, vmax: float | None = None) -> np.ndarray:
        """(N,) float32 in [0, 1]: rank (average rank of the drawn column, 0 to 1), min-max, log
        (min-max of log10), or raw clipped to [vmin, vmax] (the bag's min and max when not given).
        UsageError for log of values <= 0."""
        key = (scale, vmin, vmax)
        cached = self._scales.get(key)
        if cached is not None:
            return cached
        values = self.values
        if scale == "rank":
            t = rank_percentile(values) / 100.0
        elif scale == "log":
            if not (values > 0).all():
                raise UsageError(f"{self.bag.column}: the log scale needs positive values")
            logs = np.log10(values)
            low, high = float(logs.min()), float(logs.max())
            t = (logs - low) / (high - low) if high > low else np.full_like(values, 0.5)
        elif scale in ("minmax", "raw"):
            low = float(values.min()) if vmin is None or scale == "minmax" else vmin
            high = float(values.max()) if vmax is None or scale == "minmax" else vmax
            t = (values - low) / (high - low) if high > low else np.full_like(values, 0.5)
        else:
            raise UsageError(f"unknown scale {scale!r}: use {', '.join(SCALES)}")
        result = np.clip(t, 0.0, 1.0).astype(np.float32)
        if len(self._scales) > 16:  # raw ranges typed in the page: keep only recent ones
            self._scales.clear()
        self._scales[key] = result
        return result


def rank_percentile(values: np.ndarray) -> np.ndarray:
    """(N,) -> (N,) in [0, 100], exactly as `geojson` writes attention_percentile."""
    from smcli.geojson import rank_percentile as percentile

    return percentile(values)


def make_view_bag(
    index: int,
    bag: BagValues,
    slide: Path | None,
    slide_size: tuple[int, int] | None,
    placed: BagValues | None = None,
    notes: tuple[str, ...] = (),
) -> ViewBag:
    """A BagValues with its image geometry. slide_size: level-0 (width, height) when on a slide;
    placed: the bag with coords in level-0 pixels (smcli.scored.on_level0), when they were not."""
    finite = np.isfinite(bag.values)
    if not finite.any():
        raise BagError(f"{bag.source}: {bag.bag_id}: no finite {bag.column} values to show")
    placed = placed or bag
    coords = np.asarray(placed.coords, dtype=np.float64)
    values = np.asarray(bag.values, dtype=np.float64)
    if not finite.all():
        keep = np.flatnonzero(finite)
        bag = _subset(bag, keep)
        coords, values = coords[keep], values[keep]
    side = placed.patch_side
    if slide is not None and slide_size is not None:
        from smcli.slide import check_inside

        check_inside(coords, slide_size, f"{bag.source}: {bag.bag_id}", slide)
        origin: tuple[float, float] = (0.0, 0.0)
        size = slide_size
    else:
        low = coords.min(axis=0)
        high = coords.max(axis=0) + np.asarray(side)
        origin = (float(low[0]), float(low[1]))
        size = (max(1, math.ceil(high[0] - low[0])), max(1, math.ceil(high[1] - low[1])))
    logits = bag.scores.get("attention_logit")
    ranked = logits if logits is not None and np.isfinite(logits).all() else values
    percentile = rank_percentile(ranked)
    order = np.argsort(-values, kind="stable")  # highest first, ties: earlier patch first
    return ViewBag(index, bag, coords, values, side, origin, size, slide, percentile, order, list(notes))


def _subset(bag: BagValues, keep: np.ndarray) -> BagValues:
    """The bag restricted to rows `keep` (the finite ones)."""
    import dataclasses

    dropped = bag.values.shape[0] - keep.shape[0]
    return dataclasses.replace(
        bag,
        coords=np.asarray(bag.coords)[keep],
        values=bag.values[keep],
        labels=None if bag.labels is None else np.asarray(bag.labels)[keep],
        warnings=[
            *bag.warnings,
            f"{bag.source}: {bag.bag_id}: {dropped} patches without a finite {bag.column} are not shown",
        ],
        instances=bag.instance_ids[keep],
        scores={name: column[keep] for name, column in bag.scores.items()},
    )


def slide_for(request: ViewRequest, bag_id: str, claimed: dict[str, str]) -> Path | None:
    """The slide file of `bag_id`, or None without --slide. A single --slide file belongs to the
    first bag id that asks for it (several tables of that bag may share it); BagError otherwise."""
    if request.slide is None:
        return None
    from smcli.slide import find_slide

    if request.slide.is_dir():
        return find_slide(request.slide, bag_id)
    owner = claimed.setdefault("file", bag_id)
    if owner != bag_id:
        raise BagError(
            f"--slide {request.slide} is the slide of {owner}, not of {bag_id}; give a directory of slides"
        )
    return request.slide


def slide_facts(path: Path) -> tuple[tuple[int, int], tuple[float, float] | None]:
    """Level-0 (width, height) of a slide and its microns per pixel (x, y) or None; BagError when
    it cannot be opened."""
    from smcli.slide import open_slide
    from smcli.units import mpp_from_properties

    with open_slide(path) as handle:
        width, height = handle.dimensions
        return (int(width), int(height)), mpp_from_properties(handle.properties)


def place(bag: BagValues, mpp: float | None, slide: Path | None, slide_mpp) -> tuple[BagValues, list[str]]:
    """The bag in level-0 pixels when it goes on a slide (or when --mpp is given), and `note:` lines.

    On the patch grid, micrometre coords need no scale: they are drawn (and shown) as they are.
    """
    from smcli.scored import on_level0
    from smcli.units import PIXELS

    if slide is None and (mpp is None or bag.coords_units == PIXELS):
        return bag, []
    placed, note = on_level0(bag, mpp, slide_mpp, slide.name if slide is not None else "")
    return placed, [note] if note else []


def check_request(request: ViewRequest) -> None:
    """UsageError for what cannot work, before anything is read."""
    from smcli.units import check_mpp_flag

    check_mpp_flag(request.mpp)
    if request.slide is not None:
        from smcli.slide import require_openslide

        require_openslide()
        if not request.slide.exists():
            raise UsageError(f"{request.slide}: no such slide file or directory")


def load_bags(request: ViewRequest) -> Iterator[ViewBag | Failed]:
    """Every bag of every input with its slide, in input order; Failed for what cannot be shown.
    A bag whose slide cannot be read is Failed too: it is never shown at a guessed place."""
    check_request(request)
    values_request = ValuesRequest(
        request.inputs, request.model, request.column, request.patch_size, request.dist_thr, request.keys
    )
    claimed: dict[str, str] = {}
    facts: dict[Path, tuple[tuple[int, int], tuple[float, float] | None]] = {}
    index = 0
    for item in iter_values(values_request):
        if isinstance(item, Failed):
            yield item
            continue
        try:
            slide = slide_for(request, item.bag_id, claimed)
            size = slide_mpp = None
            if slide is not None:
                if slide not in facts:
                    facts[slide] = slide_facts(slide)
                size, slide_mpp = facts[slide]
            placed, notes = place(item, request.mpp, slide, slide_mpp)
            view_bag = make_view_bag(index, item, slide, size, placed, tuple(notes))
        except BagError as err:
            yield Failed(item.source, f"{item.bag_id}: {err}" if item.bag_id not in str(err) else str(err))
            continue
        index += 1
        yield view_bag
