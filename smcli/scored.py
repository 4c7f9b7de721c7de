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

TABLE_SUFFIXES = (".csv", ".parquet")
SCORE_COLUMNS = ("attention_logit", "attention_weight")  # carried along when a table has them


@dataclass
class BagValues:
    """One bag's patches: coords (N, 2) level-0 (x, y), the drawn value (N,), labels (N,) or None.

    `instances` (N,) are the patch indices in the bag (the table's `instance` column); `scores`
    holds the table's attention columns (each (N,)) when present.
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

    @property
    def instance_ids(self) -> np.ndarray:
        """(N,) int64 patch indices: the table's `instance` column, else the row position."""
        if self.instances is not None:
            return self.instances
        return np.arange(self.values.shape[0], dtype=np.int64)


def read_table(path: Path, column: str, patch_size: float | None) -> list[BagValues]:
    """A scores table (one bag or many) -> one BagValues per bag_id, in table order.

    The patch step is --patch-size, else the `patch_step` the score run recorded in the bags file
    beside the table, else inferred from x, y. The probability comes from that bags file too.
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
            )
        )
    return found


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
    )


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
