"""Per-patch attention as GeoJSON that QuPath imports: one square tile per patch, in place on the slide.

One FeatureCollection per bag. Each Feature is a closed square Polygon in level-0 pixel coordinates,
always (what QuPath expects): the patch's x, y and side (the patch step) as stored when they are
pixels; micrometre coords (STAMP) divided by the slide's MPP (`--slide`) or `--mpp` (smcli.units).
Its properties are what QuPath reads:
`objectType` ("tile", or "detection"), `name`, `measurements` {attention_logit, attention_weight,
attention_percentile} to colour by, and for the top-K patches a `classification` {name, color} so
they stand out. Dragging the file onto the slide in QuPath shows the tiles over the tissue.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from smcli.bags import BagKeys
from smcli.errors import BagError, OutputError, UsageError
from smcli.files import per_bag_target, prepare_file_output
from smcli.scored import BagValues, Failed, ValuesRequest, iter_values, on_level0, prepare_output
from smcli.slide import SlideFinder
from smcli.units import PIXELS, check_mpp_flag, mpp_from_properties

TOP_CLASS = {"name": "Top attention", "color": [255, 0, 0]}
OBJECT_TYPES = ("tile", "detection")


@dataclass(frozen=True)
class GeoJsonRequest:
    inputs: list[Path]
    output: Path  # a .geojson file for one bag, else a directory of <bag_id>.geojson
    model: Path | None = None
    top_k: int = 10
    min_percentile: float = 0.0
    object_type: str = "tile"
    patch_size: float | None = None
    dist_thr: float | None = None
    keys: BagKeys = BagKeys()
    slide: Path | None = None  # the slide (file, or directory of <bag_id>.*): its MPP, its bounds
    mpp: float | None = None  # µm per level-0 pixel; overrides the slide's (micrometre coords only)
    overwrite: bool = False  # replace existing .geojson files (else that bag's error)


@dataclass
class GeoJsonResult:
    source: Path
    bag_id: str | None = None
    written: Path | None = None
    n_features: int = 0
    error: str = ""
    notes: list[str] = field(default_factory=list)  # the MPP used, when coords were micrometres


def rank_percentile(values: np.ndarray) -> np.ndarray:
    """(N,) -> (N,) in [0, 100]: 100 · (average rank − 1) / (N − 1); a single patch gets 100."""
    import pandas as pd

    if values.shape[0] == 1:
        return np.full(1, 100.0)
    ranks = pd.Series(values).rank(method="average").to_numpy()
    return 100.0 * (ranks - 1.0) / (values.shape[0] - 1)


def _numbers(values: np.ndarray) -> list:
    """(K,) floats as a list of Python numbers: all ints when all are whole (coordinates stay exact)."""
    if values.size and np.all(values == np.round(values)) and np.abs(values).max() < 2**53:
        return values.astype(np.int64).tolist()
    return values.tolist()


def feature_collection(bag: BagValues, top_k: int, min_percentile: float, object_type: str) -> dict:
    """The bag's patches as a GeoJSON FeatureCollection (a dict ready for json.dump).

    bag: in level-0 pixels (see `place`); a bag still in other units is refused.
    """
    where = f"{bag.source}: {bag.bag_id}"
    if bag.coords_units != PIXELS:
        raise BagError(f"{where}: coords in {bag.coords_units}: place them in level-0 pixels first")
    logits = bag.scores.get("attention_logit")
    weights = bag.scores.get("attention_weight")
    if logits is None or weights is None:
        raise BagError(f"{where}: needs attention_logit and attention_weight columns (a table from score)")
    if not (np.isfinite(logits).all() and np.isfinite(weights).all()):
        raise BagError(f"{where}: attention values must be finite")
    coords = np.asarray(bag.coords, dtype=np.float64)  # (N, 2) level-0 (x, y)
    side_x, side_y = bag.patch_side
    percentile = rank_percentile(logits)  # (N,)
    top = np.zeros(logits.shape[0], dtype=bool)
    top[np.argsort(-logits, kind="stable")[:top_k]] = True
    keep = np.flatnonzero(percentile >= min_percentile)  # (K,)
    # Python lists first: building 100k dicts from numpy scalars is several times slower
    columns = zip(
        bag.instance_ids[keep].tolist(),
        _numbers(coords[keep, 0]),
        _numbers(coords[keep, 1]),
        _numbers(coords[keep, 0] + side_x),
        _numbers(coords[keep, 1] + side_y),
        logits[keep].tolist(),
        weights[keep].tolist(),
        percentile[keep].tolist(),
        top[keep].tolist(),
        strict=True,
    )
    features = []
    for instance, x0, y0, x1, y1, logit, weight, rank, is_top in columns:
        properties: dict = {
            "objectType": object_type,
            "name": f"instance {instance}",
            "measurements": {
                "attention_logit": logit,
                "attention_weight": weight,
                "attention_percentile": rank,
            },
        }
        if is_top:
            properties["classification"] = dict(TOP_CLASS)
        ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
        features.append(
            {
                "type": "Feature",
                "id": str(instance),
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": properties,
            }
        )
    return {"type": "FeatureCollection", "features": features}


def place(bag: BagValues, mpp: float | None, slide_path: Path | None) -> tuple[BagValues, str]:
    """The bag in level-0 pixels (GeoJSON is always in level-0 pixels: what QuPath expects) and the
    `note:` line naming the MPP used. With a slide, its MPP (unless --mpp) and its bounds: patches
    outside the slide are that bag's error. BagError when micrometre coords have no MPP."""
    if slide_path is None:
        return on_level0(bag, mpp, None)
    from smcli.slide import check_inside, open_slide

    with open_slide(slide_path) as handle:
        slide_mpp = mpp_from_properties(handle.properties)
        size = (int(handle.dimensions[0]), int(handle.dimensions[1]))
    placed, note = on_level0(bag, mpp, slide_mpp, slide_path.name)
    check_inside(placed.coords, size, f"{bag.source}: {bag.bag_id}", slide_path)
    return placed, note


def target_path(output: Path, bag_id: str) -> Path:
    """OUT itself when it names a .geojson file; otherwise OUT/<bag_id>.geojson."""
    return per_bag_target(output, bag_id, ".geojson")


def write_json(document: dict, path: Path) -> None:
    """json.dump, atomically; OutputError when it cannot be written."""
    from smcli.files import atomic_path

    try:
        with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(document, separators=(",", ":")))  # one write: faster than dump
    except OSError as err:
        raise OutputError(f"{path}: cannot write ({err.strerror or type(err).__name__})") from None


def run_geojson(request: GeoJsonRequest) -> Iterator[GeoJsonResult]:
    """One GeoJSON file per bag. Usage problems raise before any output; a bag that cannot be
    read, scored or written yields a result with `error`, and the others go on."""
    if request.object_type not in OBJECT_TYPES:
        raise UsageError(f"unknown object type {request.object_type!r}: use {', '.join(OBJECT_TYPES)}")
    if request.top_k < 0:
        raise UsageError(f"--top-k must be at least 0, got {request.top_k}")
    if not 0.0 <= request.min_percentile <= 100.0:
        raise UsageError(f"--min-percentile must be in [0, 100], got {request.min_percentile}")
    values_request = ValuesRequest(
        request.inputs,
        request.model,
        "attention_logit",
        request.patch_size,
        request.dist_thr,
        request.keys,
        output=request.output,
        single_suffix=".geojson",
    )
    check_mpp_flag(request.mpp)
    if request.slide is not None:
        from smcli.slide import require_openslide

        require_openslide()
        if not request.slide.exists():
            raise UsageError(f"{request.slide}: no such slide file or directory")
    prepare_output(values_request)
    slide_for = None if request.slide is None else SlideFinder(request.slide)
    for item in iter_values(values_request):
        if isinstance(item, Failed):
            yield GeoJsonResult(item.source, error=item.error)
            continue
        result = GeoJsonResult(item.source, item.bag_id)
        try:
            slide_path = (
                None if slide_for is None else slide_for(item.bag_id, f"{item.source}: {item.bag_id}")
            )
            item, note = place(item, request.mpp, slide_path)
            if note:
                result.notes.append(note)
            document = feature_collection(item, request.top_k, request.min_percentile, request.object_type)
            path = target_path(request.output, item.bag_id)
            prepare_file_output(path, request.overwrite)
            write_json(document, path)
            result.written, result.n_features = path, len(document["features"])
        except (BagError, OutputError) as err:
            result.error = str(err)
        yield result
