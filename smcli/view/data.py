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

SCALES = ("rank", "minmax", "raw")


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


@dataclass
class ViewBag:
    """One bag as the viewer serves it. Arrays are (N,) over the bag's finite patches, table order.

    coords: (N, 2) level-0 (x, y) of each patch's corner; a patch covers [x, x + step) × [y, y + step).
    The image is `size` (width, height) pixels whose pixel (0, 0) is level-0 point `origin`.
    """

    index: int
    bag: BagValues
    coords: np.ndarray  # (N, 2) float64
    values: np.ndarray  # (N,) the drawn column
    step: float
    origin: tuple[float, float]
    size: tuple[int, int]
    slide: Path | None = None
    percentile: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (N,) in [0, 100]
    order: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.intp))  # highest first
    _scales: dict = field(default_factory=dict)

    @property
    def bag_id(self) -> str:
        return self.bag.bag_id

    def scaled(self, scale: str, vmin: float | None = None, vmax: float | None = None) -> np.ndarray:
        """(N,) float32 in [0, 1]: rank (percentile / 100), min-max, or raw clipped to [vmin, vmax]."""
        key = (scale, vmin, vmax)
        cached = self._scales.get(key)
        if cached is not None:
            return cached
        values = self.values
        if scale == "rank":
            t = self.percentile / 100.0
        elif scale in ("minmax", "raw"):
            lo = float(values.min()) if vmin is None or scale == "minmax" else vmin
            hi = float(values.max()) if vmax is None or scale == "minmax" else vmax
            t = (values - lo) / (hi - lo) if hi > lo else np.full_like(values, 0.5)
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
    index: int, bag: BagValues, slide: Path | None, slide_size: tuple[int, int] | None
) -> ViewBag:
    """A BagValues with its image geometry. slide_size: level-0 (width, height) when on a slide."""
    finite = np.isfinite(bag.values)
    if not finite.any():
        raise BagError(f"{bag.source}: {bag.bag_id}: no finite {bag.column} values to show")
    # UNITS HOOK (issue 17 section 3): coords are taken as level-0 pixels here; once the units
    # machinery lands, micrometre coords are converted with the slide's MPP (or --mpp) before this.
    coords = np.asarray(bag.coords, dtype=np.float64)
    values = np.asarray(bag.values, dtype=np.float64)
    if not finite.all():
        keep = np.flatnonzero(finite)
        bag = _subset(bag, keep)
        coords, values = coords[keep], values[keep]
    step = float(bag.patch_step)
    if slide is not None and slide_size is not None:
        from smcli.slide import check_inside

        check_inside(coords, slide_size, f"{bag.source}: {bag.bag_id}", slide)
        origin: tuple[float, float] = (0.0, 0.0)
        size = slide_size
    else:
        low = coords.min(axis=0)
        high = coords.max(axis=0) + step
        origin = (float(low[0]), float(low[1]))
        size = (max(1, math.ceil(high[0] - low[0])), max(1, math.ceil(high[1] - low[1])))
    logits = bag.scores.get("attention_logit")
    ranked = logits if logits is not None and np.isfinite(logits).all() else values
    percentile = rank_percentile(ranked)
    order = np.argsort(-values, kind="stable")  # highest first, ties: earlier patch first
    return ViewBag(index, bag, coords, values, step, origin, size, slide, percentile, order)


def _subset(bag: BagValues, keep: np.ndarray) -> BagValues:
    """The bag restricted to rows `keep` (the finite ones)."""
    return BagValues(
        bag.bag_id,
        bag.source,
        np.asarray(bag.coords)[keep],
        bag.values[keep],
        bag.column,
        bag.patch_step,
        None if bag.labels is None else np.asarray(bag.labels)[keep],
        bag.probability,
        [
            *bag.warnings,
            f"{bag.source}: {bag.bag_id}: {bag.values.shape[0] - keep.shape[0]} patches "
            f"without a finite {bag.column} are not shown",
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


def slide_dimensions(path: Path) -> tuple[int, int]:
    """Level-0 (width, height) of a slide; BagError when it cannot be opened."""
    from smcli.slide import open_slide

    with open_slide(path) as handle:
        width, height = handle.dimensions
    return int(width), int(height)


def check_request(request: ViewRequest) -> None:
    """UsageError for what cannot work, before anything is read."""
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
    sizes: dict[Path, tuple[int, int]] = {}
    index = 0
    for item in iter_values(values_request):
        if isinstance(item, Failed):
            yield item
            continue
        try:
            slide = slide_for(request, item.bag_id, claimed)
            size = None
            if slide is not None:
                if slide not in sizes:
                    sizes[slide] = slide_dimensions(slide)
                size = sizes[slide]
            view_bag = make_view_bag(index, item, slide, size)
        except BagError as err:
            yield Failed(item.source, f"{item.bag_id}: {err}" if item.bag_id not in str(err) else str(err))
            continue
        index += 1
        yield view_bag
