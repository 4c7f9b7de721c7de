"""Per-patch attention to draw or export: read from `smcli score` tables, or scored on the spot.

`heatmap` and `geojson` both take INPUT... as tables (.csv/.parquet, one bag or many) and/or bag
files with a model; this module turns either into one `BagValues` per bag, in input order.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from smcli.bags import BagKeys, find_bags
from smcli.errors import BagError, SmcliError, UsageError
from smcli.units import PIXELS, parse_units

TABLE_SUFFIXES = (".csv", ".parquet")
SCORE_COLUMNS = ("attention_logit", "attention_weight")  # carried along when a table has them


@dataclass
class BagValues:
    """One bag's patches: coords (N, 2) level-0 (x, y), the drawn value (N,), labels (N,) or None.

    `instances` (N,) are the patch indices in the bag (the table's `instance` column); `scores`
    holds the table's attention columns (each (N,)) when present. `coords_units` is the unit of
    coords and patch_step (smcli.units: "level-0 pixels" or "micrometres"; an unknown unit is kept
    as written); smcli.units.to_level0 places them on a slide.
    """

    bag_id: str
    source: Path
    coords: np.ndarray
    values: np.ndarray
    column: str
    patch_step: float
    labels: np.ndarray | None = None
    probability: float | None = None
    warnings: list[str] = field(default_factory=list)
    instances: np.ndarray | None = None
    scores: dict[str, np.ndarray] = field(default_factory=dict)
    coords_units: str = PIXELS
    patch_step_y: float | None = None  # the side along y, when it differs from patch_step (along x)
    converted_at: str = ""  # "0.5 µm/px (--mpp)": the MPP on_level0 used to turn micrometres into pixels

    @property
    def patch_side(self) -> tuple[float, float]:
        """(side_x, side_y) of a patch in coords units (they differ only on non-square slide pixels)."""
        return (self.patch_step, self.patch_step if self.patch_step_y is None else self.patch_step_y)

    @property
    def instance_ids(self) -> np.ndarray:
        """(N,) int64 patch indices: the table's `instance` column, else the row position."""
        if self.instances is not None:
            return self.instances
        return np.arange(self.values.shape[0], dtype=np.int64)


def read_table(path: Path, column: str, patch_size: float | None) -> list[BagValues]:
    """A scores table (one bag or many) -> one BagValues per bag_id, in table order.

    The patch step is --patch-size, else the `patch_step` the score run recorded in the bags file
    beside the table, else inferred from x, y. The probability comes from that bags file too, and
    the coords' unit from the table (see `table_units`).
    """
    import pandas as pd

    from smcli.graph import infer_patch_step

    try:
        table = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    except FileNotFoundError:
        raise BagError(f"{path}: no such file") from None
    except (OSError, ValueError) as err:
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BagError(f"{path}: cannot read as a scores table ({detail[:120]})") from None
    present = ", ".join(map(str, table.columns)) or "none"
    for name in ("x", "y"):
        if name not in table.columns:
            raise BagError(f"{path}: no '{name}' column: not a scores table (columns: {present})")
    if column not in table.columns:
        raise UsageError(f"{path}: no column {column!r} (columns: {present})")
    for name in (column, "x", "y"):
        if not pd.api.types.is_numeric_dtype(table[name]):
            raise UsageError(f"{path}: column {name!r} is not numeric")
    if table.empty:
        raise BagError(f"{path}: empty table: nothing to draw")
    if "bag_id" not in table.columns:
        table = table.assign(bag_id=path.stem)
    summaries = bags_file_rows(path)
    own = own_provenance(path)
    if own is not None:  # a per-bag file's own provenance beats any row about it (rows can be stale)
        summaries[own.get("bag_id", "")] = own
    stated_units = parquet_units(path) if path.suffix == ".parquet" else {}
    unnamed = int(table["bag_id"].isna().sum() + (table["bag_id"].astype(str).str.strip() == "").sum())
    if unnamed:  # groupby would drop these rows: never a silent picture-less exit 0
        raise BagError(f"{path}: {unnamed} of {len(table)} rows have an empty bag_id")
    found = []
    for bag_id, rows in table.groupby("bag_id", sort=False):
        coords = rows[["x", "y"]].to_numpy()
        if not np.isfinite(coords).all():
            raise BagError(f"{path}: {bag_id}: x, y must be finite numbers")
        recorded = summaries.get(str(bag_id), {})
        step = patch_size or _positive(recorded.get("patch_step")) or infer_patch_step(coords) or 1.0
        labels = None
        if "label" in rows.columns:  # a multi-bag CSV leaves it empty for bags without labels
            label = pd.to_numeric(rows["label"], errors="coerce")
            labels = None if label.isna().all() else (label.fillna(0).to_numpy() == 1)
        instances = None
        if "instance" in rows.columns and pd.api.types.is_integer_dtype(rows["instance"]):
            instances = rows["instance"].to_numpy(dtype=np.int64)
        scores = {
            name: rows[name].to_numpy(dtype=np.float64)
            for name in SCORE_COLUMNS
            if name in rows.columns and pd.api.types.is_numeric_dtype(rows[name])
        }
        found.append(
            BagValues(
                str(bag_id),
                path,
                coords,
                rows[column].to_numpy(dtype=np.float64),
                column,
                float(step),
                labels,
                _positive(recorded.get("probability"), allow_zero=True),
                instances=instances,
                scores=scores,
                coords_units=table_units(stated_units, recorded, str(bag_id)),
            )
        )
    return found


def parquet_units(path: Path) -> dict[str, str]:
    """`smcli.coords_units` from a parquet table's key-value metadata, by bag_id ('' = every bag).

    A per-bag table holds the key itself; a multi-bag table holds it when all bags share it, else
    in each bag's entry of the `smcli.bags` JSON list. {} when the file says nothing.
    """
    import json

    import pyarrow.parquet as pq

    try:
        metadata = pq.read_metadata(path).metadata or {}
    except (OSError, ValueError):
        return {}
    text = {
        key.decode("utf-8", "replace"): value.decode("utf-8", "replace") for key, value in metadata.items()
    }
    found: dict[str, str] = {}
    if text.get("smcli.coords_units"):
        found[""] = text["smcli.coords_units"]
    try:
        per_bag = json.loads(text.get("smcli.bags", "[]"))
    except ValueError:
        per_bag = []
    for entry in per_bag if isinstance(per_bag, list) else []:
        if isinstance(entry, dict) and entry.get("smcli.coords_units") and "smcli.bag_id" in entry:
            found[str(entry["smcli.bag_id"])] = str(entry["smcli.coords_units"])
    return found


def table_units(stated: dict[str, str], recorded: dict, bag_id: str) -> str:
    """The unit of a table bag's x, y: its parquet metadata (see parquet_units), else the
    `coords_units` of its row in the bags file beside the table, else level-0 pixels (tables from
    before smcli recorded units, or a CSV streamed to stdout, which has no bags file)."""
    stated_unit = stated.get(bag_id) or stated.get("") or recorded.get("coords_units")
    try:
        return parse_units(stated_unit)
    except BagError:
        return str(stated_unit)  # kept as written: placing it on a slide names it


def own_provenance(table_path: Path) -> dict[str, str] | None:
    """A per-bag table's provenance (smcli.files.read_provenance), keys without `smcli.`."""
    from smcli.files import read_provenance

    found = read_provenance(table_path)
    if found is None or "smcli.bag_id" not in found:
        return None
    return {key.removeprefix("smcli."): value for key, value in found.items()}


def bags_file_rows(table_path: Path) -> dict[str, dict]:
    """Rows of the `_bags.csv` / `<stem>_bags.csv` / shard bags files beside a table, by bag_id."""
    import pandas as pd

    folder = table_path.parent
    candidates = [folder / f"{table_path.stem}_bags.csv", *sorted(folder.glob("_bags*.csv"))]
    rows: dict[str, dict] = {}
    for candidate in candidates:
        try:
            frame = pd.read_csv(candidate)
        except (OSError, ValueError):
            continue
        if "bag_id" in frame.columns:
            for row in frame.to_dict("records"):
                rows.setdefault(str(row["bag_id"]), row)
    return rows


def _positive(value, allow_zero: bool = False) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(number) or number < 0 or (number == 0 and not allow_zero):
        return None
    return number


def score_for_values(path: Path, model, column: str, options) -> BagValues:
    """Read a bag, score it with the model (smcli.scoring), and keep its per-patch values."""
    from smcli.bags import load_bag
    from smcli.scoring import score_bag

    bag = load_bag(path, options.keys)
    result = score_bag(model, bag, options)
    table = result.table
    if column not in table.columns:
        raise UsageError(f"{path}: no column {column!r} in its scores (columns: {', '.join(table.columns)})")
    summary = result.summary
    return BagValues(
        bag.bag_id,
        path,
        np.asarray(bag.coords),
        table[column].to_numpy(dtype=np.float64),
        column,
        float(summary.patch_step or 1.0),  # always set for a scored bag
        None if bag.labels is None else np.asarray(bag.labels),
        summary.probability,
        list(summary.warnings),
        instances=table["instance"].to_numpy(dtype=np.int64),
        scores={name: table[name].to_numpy(dtype=np.float64) for name in SCORE_COLUMNS},
        coords_units=summary.coords_units or PIXELS,
    )


def on_level0(
    bag: BagValues, mpp_flag: float | None, slide_mpp: tuple[float, float] | None, slide_name: str = ""
) -> tuple[BagValues, str]:
    """The bag with coords and patch step in level-0 pixels (smcli.units.to_level0), and one line
    for a `note:` saying which MPP was used ('' when nothing needed converting).

    mpp_flag: `--mpp`, which overrides slide_mpp (the slide's own, smcli.slide.slide_mpp), and is
    only noted when the coords are pixels already. BagError naming --mpp when micrometre coords
    have neither. slide_name names the slide in that error ('' when no slide was given).
    """
    import dataclasses

    from smcli.units import PIXELS as LEVEL0_PIXELS
    from smcli.units import resolve_mpp, to_level0

    where = f"{bag.source}: {bag.bag_id}"
    if bag.coords_units == LEVEL0_PIXELS:
        note = f"{where}: --mpp {mpp_flag:g} not used: coords are level-0 pixels already" if mpp_flag else ""
        return bag, note
    mpp = resolve_mpp(mpp_flag, slide_mpp, slide_name)
    if slide_name:
        hint = f"slide {slide_name} records no microns per pixel (openslide.mpp-x/y)"
    else:
        hint = "no --slide gives the scale"
    placed = to_level0(bag.coords, bag.patch_step, bag.coords_units, mpp, where, hint)
    side_x, side_y = placed.patch_side
    converted = dataclasses.replace(
        bag,
        coords=placed.coords,
        patch_step=side_x,
        patch_step_y=None if side_y == side_x else side_y,
        coords_units=LEVEL0_PIXELS,
        converted_at=mpp.describe() if mpp is not None else "",
    )
    return converted, f"{where}: {placed.note}"


def split_inputs(inputs: list[Path]) -> tuple[list[Path], list[Path]]:
    """(tables, bags): .csv/.parquet files are tables; directories give both (bags files excluded)."""
    tables: list[Path] = []
    bag_items: list[Path] = []
    for item in inputs:
        if not item.exists():
            raise UsageError(f"{item}: no such file or directory")
        if item.is_dir():
            tables.extend(
                sorted(
                    p
                    for p in item.iterdir()
                    if p.is_file() and p.suffix in TABLE_SUFFIXES and not _is_bags_file(p)
                )
            )
            bag_items.extend(find_bags([item]))
        elif item.suffix in TABLE_SUFFIXES:
            tables.append(item)
        else:
            bag_items.append(item)
    return tables, bag_items


def _is_bags_file(path: Path) -> bool:
    return path.name.startswith("_bags") or path.stem.endswith("_bags")


@dataclass(frozen=True)
class ValuesRequest:
    """Where per-patch values come from (see `iter_values`)."""

    inputs: list[Path]
    model: Path | None = None
    column: str = "attention_logit"
    patch_size: float | None = None
    dist_thr: float | None = None
    keys: BagKeys = BagKeys()
    output: Path | None = None  # where the per-bag files go (see prepare_output)
    single_suffix: str = ".png"  # an output ending with this is one file, holding one bag


@dataclass
class Failed:
    """An input (table or bag) that could not be read or scored: `error` is its one-line message."""

    source: Path
    error: str


def count_inputs(request: ValuesRequest) -> tuple[list[Path], list[Path]]:
    """(tables, bags) of the request; UsageError when there is nothing or a bag lacks a model."""
    if not request.inputs:
        raise UsageError("no inputs")
    tables, bag_paths = split_inputs(request.inputs)
    if not tables and not bag_paths:
        raise UsageError(f"nothing to read in {', '.join(map(str, request.inputs))}")
    if bag_paths:
        from smcli.scoring import INSTANCE_COLUMNS  # only bags are scored: tables need no scorer

        if request.model is None:
            raise UsageError(f"{bag_paths[0]}: a bag file needs a model to score it (-m MODEL)")
        if request.column not in (*INSTANCE_COLUMNS, "label"):
            raise UsageError(
                f"{bag_paths[0]}: no column {request.column!r} in scores "
                f"(columns: {', '.join(INSTANCE_COLUMNS)}, label)"
            )
    return tables, bag_paths


def prepare_output(request: ValuesRequest) -> None:
    """Check the inputs (see count_inputs) and create the output folder, before anything is read.

    `request.output` names one file when it ends with `request.single_suffix` (then it holds one
    bag), else a directory of per-bag files. UsageError when that cannot work.
    """
    output, suffix = request.output, request.single_suffix
    assert output is not None and suffix
    tables, bag_paths = count_inputs(request)
    single = output.suffix.lower() == suffix
    if single and len(tables) + len(bag_paths) > 1:
        raise UsageError(f"{output}: one {suffix} holds one bag; give a directory for several inputs")
    folder = output.parent if single else output
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"{folder}: cannot create output directory ({err.strerror})") from None


def iter_values(request: ValuesRequest) -> Iterator[BagValues | Failed]:
    """Every bag of every input, as BagValues, or Failed for an input that cannot be used.

    Usage and model problems raise (UsageError/ModelError) before the first bag; call
    `count_inputs` first to get them before creating any output.
    """
    tables, bag_paths = count_inputs(request)
    model = None
    if bag_paths and request.model is not None:  # count_inputs made sure a bag comes with a model
        from smcli.checkpoint import load_model

        model = load_model(request.model)
    for table in tables:
        try:
            found = read_table(table, request.column, request.patch_size)
        except BagError as err:
            yield Failed(table, str(err))
            continue
        output = request.output
        single = output is not None and output.suffix.lower() == request.single_suffix
        if single and len(found) > 1:
            raise UsageError(
                f"{table}: holds {len(found)} bags, one {request.single_suffix} holds one; "
                "give a directory as -o"
            )
        yield from found
    if not bag_paths:
        return
    from smcli.scoring import ScoreOptions

    options = ScoreOptions(request.keys, request.patch_size, request.dist_thr, "cpu")
    for path in bag_paths:
        try:
            yield score_for_values(path, model, request.column, options)
        except UsageError:
            raise
        except SmcliError as err:
            yield Failed(path, str(err))
