"""Patch data as JSON: the bag list, the patch under the pointer, the top-K list.

Numbers are the table's own float64 values, written by `json` as the shortest text that reads
back to the same double, so the page shows what `smcli score` wrote. `attention_percentile` is
`geojson`'s (rank of attention_logit, 0-100).
"""

from __future__ import annotations

import math

import numpy as np

from smcli.view.data import ViewBag

TOP_K_MAX = 200


def _number(value) -> float | int | None:
    number = float(value)
    if not math.isfinite(number):
        return None
    return int(number) if number.is_integer() and abs(number) < 2**53 else number


def _placed_at(bag: ViewBag) -> str:
    """'' for pixel coords; else how micrometres were placed, or that they are drawn as they are."""
    placed = [note for note in bag.notes if "micrometres" in note]
    if placed:
        return placed[0].split(": ")[-1]
    from smcli.units import PIXELS

    return "" if bag.bag.coords_units == PIXELS else f"coords in {bag.bag.coords_units}, drawn as they are"


def bag_summary(bag: ViewBag) -> dict:
    """One entry of the bag list."""
    return {
        "index": bag.index,
        "bag_id": bag.bag_id,
        "source": bag.bag.source.name,
        "probability": None if bag.bag.probability is None else _number(bag.bag.probability),
        "patches": int(bag.values.shape[0]),
        "column": bag.bag.column,
        "side": [_number(bag.side[0]), _number(bag.side[1])],
        "units": bag.bag.coords_units,
        "placed_at": _placed_at(bag),
        "origin": [_number(bag.origin[0]), _number(bag.origin[1])],
        "width": bag.size[0],
        "height": bag.size[1],
        "slide": None if bag.slide is None else bag.slide.name,
        "has_labels": bag.bag.labels is not None,
        "min": _number(bag.values.min()),
        "max": _number(bag.values.max()),
        "warnings": list(bag.bag.warnings),
    }


def patch_record(bag: ViewBag, row: int) -> dict:
    """Everything the page shows of patch `row` (a position in the bag's arrays)."""
    source = bag.bag
    record: dict = {
        "row": int(row),
        "instance": int(source.instance_ids[row]),
        "x": _number(np.asarray(source.coords)[row, 0]),  # the table's own x, y (its unit)
        "y": _number(np.asarray(source.coords)[row, 1]),
        # the patch's box in image coordinates (level-0 pixels on a slide), for the page to draw
        "box": [_number(bag.coords[row, 0]), _number(bag.coords[row, 1]), *map(_number, bag.side)],
    }
    for name in ("attention_logit", "attention_weight"):
        column = source.scores.get(name)
        record[name] = None if column is None else _number(column[row])
    if source.column not in record:
        record[source.column] = _number(bag.values[row])
    record["label"] = None if source.labels is None else int(bool(np.asarray(source.labels)[row]))
    record["attention_percentile"] = _number(bag.percentile[row])
    return record


def patch_at(bag: ViewBag, x: float, y: float) -> dict | None:
    """The patch whose footprint holds image point (x, y) (level-0 pixels on a slide): where
    footprints overlap, the one with the highest value (the one the attention layer shows there).
    None where there is no patch."""
    coords = bag.coords
    hit = np.flatnonzero(
        (coords[:, 0] <= x)
        & (x < coords[:, 0] + bag.side[0])
        & (coords[:, 1] <= y)
        & (y < coords[:, 1] + bag.side[1])
    )
    if hit.size == 0:
        return None
    row = int(hit[np.argmax(bag.values[hit])])
    return patch_record(bag, row)


def top_patches(bag: ViewBag, k: int) -> list[dict]:
    """The k highest patches by the shown column, highest first, each with its rank (1 = top)."""
    chosen = bag.order[: max(0, min(k, TOP_K_MAX))]
    return [{"rank": rank, **patch_record(bag, int(row))} for rank, row in enumerate(chosen, start=1)]
