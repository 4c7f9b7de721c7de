"""Attention heatmaps without the slide image: one coloured square per patch on the patch grid.

Inputs are scores tables written by `smcli score` (one bag or many: one PNG per bag_id) or bag files
scored on the spot with a model. Each patch's value (a table column, attention_logit by default) is
normalized to [0, 1] (`--norm`), coloured with a dark-to-light map and drawn at its grid cell
(`smcli.graph.grid_cells`), a whole number of pixels per cell (the longer side near 800 px, at
least 1 px per cell). Cells without a patch stay light grey, never a colour of the map. A colour bar
with labelled ticks, the bag id, and the bag probability (when known) frame the map; `--labels`
outlines the region of label-1 patches.

Pillow is an optional dependency (`pip install 'smcli[plot]'`), imported only here.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from smcli.bags import BagKeys, find_bags
from smcli.errors import BagError, OutputError, SmcliError, UsageError

NORMS = ("raw", "minmax", "rank", "log")
TABLE_SUFFIXES = (".csv", ".parquet")
TARGET_SIDE = 800  # pixels on the longer side of the map, give or take a cell's rounding

# Own colour map: anchors hand-picked along a dark indigo -> plum -> orange -> pale yellow path whose
# lightness rises monotonically, interpolated linearly in RGB. Dark means low, so the light grey
# background can never be read as low attention.
ANCHORS = np.array([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
ANCHOR_RGB = np.array(
    [
        (18, 14, 48),
        (62, 26, 112),
        (128, 37, 126),
        (196, 62, 96),
        (243, 128, 52),
        (250, 236, 110),
    ],
    dtype=np.float64,
)
BACKGROUND = (226, 226, 226)  # cells without a patch
CANVAS = (255, 255, 255)
OUTLINE = (0, 214, 255)  # cyan: far from every colour of the map
TEXT = (20, 20, 20)

PAD = 16
TITLE_H = 46
BAR_GAP = 24
BAR_W = 22
TICK_W = 78
LEGEND_H = 30
MIN_BAR_H = 200
MIN_WIDTH = 420
MAX_CELLS = 16_000_000  # 4000 x 4000 cells: far beyond any slide at a sane patch step


def colormap(t: np.ndarray) -> np.ndarray:
    """(…,) values in [0, 1] -> (…, 3) uint8 RGB."""
    t = np.clip(np.asarray(t, dtype=np.float64), 0.0, 1.0)
    channels = [np.interp(t, ANCHORS, ANCHOR_RGB[:, c]) for c in range(3)]
    return np.rint(np.stack(channels, axis=-1)).astype(np.uint8)


@dataclass
class BagValues:
    """What one heatmap needs: coords (N, 2), one value per patch (N,), labels (N,) or None."""

    bag_id: str
    source: Path
    coords: np.ndarray
    values: np.ndarray
    column: str
    patch_step: float
    labels: np.ndarray | None = None
    probability: float | None = None
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Scale:
    """Values mapped to [0, 1], and the colour bar's ticks: (position in [0, 1], label)."""

    t: np.ndarray
    ticks: list[tuple[float, str]]
    caption: str


def normalize(values: np.ndarray, norm: str, where: str = "") -> Scale:
    """(N,) finite values -> Scale. `where` names the data in errors (log of non-positive values)."""
    values = np.asarray(values, dtype=np.float64)
    fractions = (0.0, 0.25, 0.5, 0.75, 1.0)
    if norm == "rank":
        import pandas as pd

        ranks = pd.Series(values).rank(method="average").to_numpy()
        t = (ranks - 1.0) / (len(values) - 1) if len(values) > 1 else np.ones_like(values)
        return Scale(t, [(f, f"{f * 100:.0f}%") for f in fractions], "percentile rank")
    if norm == "log":
        bad = int((values <= 0).sum())
        if bad:
            raise UsageError(
                f"{where}: --norm log needs positive values; {bad} of {len(values)} are <= 0 "
                "(attention_weight is always positive)"
            )
        logs = np.log10(values)
        t, lo, hi = _stretch(logs)
        return Scale(t, [(f, f"{10 ** (lo + f * (hi - lo)):.3g}") for f in fractions], "log scale")
    if norm not in ("raw", "minmax"):
        raise UsageError(f"unknown --norm {norm!r}: use {', '.join(NORMS)}")
    t, lo, hi = _stretch(values)
    if norm == "minmax":
        return Scale(t, [(f, f"{f:g}") for f in fractions], "min-max scaled")
    return Scale(t, [(f, f"{lo + f * (hi - lo):.3g}") for f in fractions], "raw values")


def _stretch(values: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Linear map of [min, max] onto [0, 1]; a constant bag sits in the middle."""
    lo, hi = float(values.min()), float(values.max())
    if hi > lo:
        return (values - lo) / (hi - lo), lo, hi
    return np.full_like(values, 0.5), lo - 0.5, hi + 0.5


@dataclass(frozen=True)
class Layout:
    """Pixel geometry of one heatmap image for a grid of nx × ny cells."""

    nx: int
    ny: int
    cell: int

    @classmethod
    def for_grid(cls, nx: int, ny: int) -> Layout:
        return cls(nx, ny, max(1, TARGET_SIDE // max(nx, ny)))

    @property
    def map_origin(self) -> tuple[int, int]:
        return PAD, PAD + TITLE_H

    @property
    def map_size(self) -> tuple[int, int]:
        return self.nx * self.cell, self.ny * self.cell

    @property
    def bar_box(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of the colour bar, exclusive ends."""
        x0 = PAD + self.map_size[0] + BAR_GAP
        y0 = PAD + TITLE_H
        return x0, y0, x0 + BAR_W, y0 + max(self.map_size[1], MIN_BAR_H)

    @property
    def size(self) -> tuple[int, int]:
        x0, y0, x1, y1 = self.bar_box
        return max(x1 + TICK_W + PAD, MIN_WIDTH), y1 + LEGEND_H + PAD


def cell_image(cells: np.ndarray, t: np.ndarray, nx: int, ny: int) -> np.ndarray:
    """(ny, nx, 3) uint8: each occupied cell coloured by its value (the highest, if patches share it)."""
    image = np.empty((ny, nx, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    order = np.argsort(t, kind="stable")  # later writes win: the hottest patch of a cell shows
    image[cells[order, 1], cells[order, 0]] = colormap(t[order])
    return image


def outline_mask(cells: np.ndarray, labels: np.ndarray, nx: int, ny: int, cell: int) -> np.ndarray:
    """(ny*cell, nx*cell) bool: the inner border, `width` pixels wide, of the label-1 region."""
    marked = np.zeros((ny, nx), dtype=bool)
    positive = labels.astype(bool)
    marked[cells[positive, 1], cells[positive, 0]] = True
    region = np.repeat(np.repeat(marked, cell, axis=0), cell, axis=1)
    width = 1 if cell < 4 else max(2, cell // 8)  # visible, yet most of an edge cell keeps its colour
    padded = np.pad(region, width, constant_values=False)
    inner = region.copy()
    height, span = region.shape
    for d in range(1, width + 1):  # erosion by a (2w+1) cross, one shift at a time
        inner &= padded[width - d : width - d + height, width : width + span]
        inner &= padded[width + d : width + d + height, width : width + span]
        inner &= padded[width : width + height, width - d : width - d + span]
        inner &= padded[width : width + height, width + d : width + d + span]
    return region & ~inner


def render(bag: BagValues, norm: str = "rank", outline: bool = False):
    """The heatmap of one bag as a PIL RGB image (see Layout for its geometry)."""
    from PIL import Image, ImageDraw

    from smcli.graph import GraphError, grid_cells

    finite = np.isfinite(bag.values)
    coords, values = bag.coords[finite], bag.values[finite]
    if values.shape[0] == 0:
        raise BagError(f"{bag.source}: {bag.bag_id}: no finite {bag.column} values to draw")
    scale = normalize(values, norm, f"{bag.source}: {bag.bag_id}")
    try:
        cells = grid_cells(coords, bag.patch_step)
    except GraphError as err:
        raise BagError(f"{bag.source}: {bag.bag_id}: {err}") from None
    nx, ny = int(cells[:, 0].max()) + 1, int(cells[:, 1].max()) + 1
    if nx * ny > MAX_CELLS:  # a step far below the real one (e.g. inferred from jittered coords)
        raise BagError(
            f"{bag.source}: {bag.bag_id}: a grid of {nx} x {ny} cells at patch step {bag.patch_step:g} "
            "is too large to draw; check --patch-size"
        )
    layout = Layout.for_grid(nx, ny)

    image = Image.new("RGB", layout.size, CANVAS)
    grid = cell_image(cells, scale.t, nx, ny)
    pixels = np.repeat(np.repeat(grid, layout.cell, axis=0), layout.cell, axis=1)
    if outline and bag.labels is not None:
        pixels[outline_mask(cells, bag.labels[finite], nx, ny, layout.cell)] = OUTLINE
    image.paste(Image.fromarray(pixels, "RGB"), layout.map_origin)

    draw = ImageDraw.Draw(image)
    font = _font(14)
    small = _font(12)
    title = bag.bag_id if bag.probability is None else f"{bag.bag_id}    probability {bag.probability:.3f}"
    draw.text((PAD, PAD), title, fill=TEXT, font=font)
    subtitle = f"{bag.column}, {scale.caption}; {values.shape[0]} patches, step {bag.patch_step:g}"
    draw.text((PAD, PAD + 22), subtitle, fill=TEXT, font=small)
    _draw_bar(draw, layout, scale, small)
    _draw_legend(draw, layout, outline and bag.labels is not None, small)
    return image


def _draw_bar(draw, layout: Layout, scale: Scale, font) -> None:
    x0, y0, x1, y1 = layout.bar_box
    height = y1 - y0
    for row in range(height):  # top is 1 (hottest), bottom 0
        colour = tuple(int(c) for c in colormap(np.array(1.0 - row / max(1, height - 1))))
        draw.line([(x0, y0 + row), (x1 - 1, y0 + row)], fill=colour)
    draw.rectangle([x0 - 1, y0 - 1, x1, y1], outline=TEXT)
    for position, label in scale.ticks:
        y = y0 + round((1.0 - position) * (height - 1))
        draw.line([(x1, y), (x1 + 4, y)], fill=TEXT)
        draw.text((x1 + 7, y), label, fill=TEXT, font=font, anchor="lm")


def _draw_legend(draw, layout: Layout, outlined: bool, font) -> None:
    x, y = PAD, layout.bar_box[3] + 10
    draw.rectangle([x, y, x + 14, y + 14], fill=BACKGROUND, outline=TEXT)
    draw.text((x + 20, y + 7), "no patch", fill=TEXT, font=font, anchor="lm")
    if outlined:
        x += 110
        draw.rectangle([x, y, x + 14, y + 14], outline=OUTLINE, width=3)
        draw.text((x + 20, y + 7), "label 1", fill=TEXT, font=font, anchor="lm")


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # scalable with FreeType (Pillow >= 10.1)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def require_pillow() -> None:
    try:
        import PIL  # noqa: F401
    except ImportError:
        raise UsageError("drawing heatmaps needs Pillow: pip install 'smcli[plot]'") from None


# --- where the values come from ---------------------------------------------------------------


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
    if not pd.api.types.is_numeric_dtype(table[column]):
        raise UsageError(f"{path}: column {column!r} is not numeric")
    if table.empty:
        raise BagError(f"{path}: empty table: nothing to draw")
    if "bag_id" not in table.columns:
        table = table.assign(bag_id=path.stem)
    summaries = bags_file_rows(path)
    found = []
    for bag_id, rows in table.groupby("bag_id", sort=False):
        coords = rows[["x", "y"]].to_numpy()
        recorded = summaries.get(str(bag_id), {})
        step = patch_size or _positive(recorded.get("patch_step")) or infer_patch_step(coords) or 1.0
        labels = None
        if "label" in rows.columns:  # a multi-bag CSV leaves it empty for bags without labels
            label = pd.to_numeric(rows["label"], errors="coerce")
            labels = None if label.isna().all() else (label.fillna(0).to_numpy() == 1)
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


def score_for_heatmap(path: Path, model, column: str, options) -> BagValues:
    """Read a bag, score it with the model, and keep what the heatmap needs."""
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
        bag.coords,
        table[column].to_numpy(dtype=np.float64),
        column,
        float(summary.patch_step or 1.0),  # always set for a scored bag
        bag.labels,
        summary.probability,
        list(summary.warnings),
    )


# --- the command --------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeatmapRequest:
    inputs: list[Path]
    output: Path
    model: Path | None = None
    column: str = "attention_logit"
    norm: str = "rank"
    labels: bool = False
    patch_size: float | None = None
    dist_thr: float | None = None
    keys: BagKeys = BagKeys()


@dataclass
class HeatmapResult:
    """One bag drawn (written set) or failed (error set); warnings either way."""

    source: Path
    bag_id: str | None = None
    written: Path | None = None
    error: str = ""
    warnings: list[str] = field(default_factory=list)


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


def target_path(output: Path, bag_id: str) -> Path:
    """OUT itself when it names a .png; otherwise OUT/<bag_id>.png."""
    if output.suffix.lower() == ".png":
        return output
    from smcli.writers import safe_bag_id

    if not safe_bag_id(bag_id):
        raise OutputError(f"{output}: bag_id {bag_id!r} cannot be used as a file name")
    return output / f"{bag_id}.png"


def write_png(image, path: Path) -> None:
    from smcli.writers import atomic_path

    try:
        with atomic_path(path) as tmp:
            image.save(tmp, format="PNG")
    except OSError as err:
        raise OutputError(f"{path}: cannot write ({err.strerror or type(err).__name__})") from None


def run_heatmap(request: HeatmapRequest) -> Iterator[HeatmapResult]:
    """Draw every bag of every input. Usage problems raise UsageError/ModelError before any output;
    a bag that cannot be read or drawn yields a result with `error` and the others go on."""
    from smcli.scoring import INSTANCE_COLUMNS, ScoreOptions

    if request.norm not in NORMS:
        raise UsageError(f"unknown --norm {request.norm!r}: use {', '.join(NORMS)}")
    require_pillow()
    if not request.inputs:
        raise UsageError("no inputs")
    tables, bag_paths = split_inputs(request.inputs)
    if not tables and not bag_paths:
        raise UsageError(f"nothing to draw in {', '.join(map(str, request.inputs))}")
    single = request.output.suffix.lower() == ".png"
    if single and len(tables) + len(bag_paths) > 1:
        raise UsageError(f"{request.output}: one .png holds one bag; give a directory for several inputs")
    model = None
    if bag_paths:
        if request.model is None:
            raise UsageError(f"{bag_paths[0]}: a bag file needs a model to score it (-m MODEL)")
        if request.column not in (*INSTANCE_COLUMNS, "label"):
            raise UsageError(
                f"{bag_paths[0]}: no column {request.column!r} in scores "
                f"(columns: {', '.join(INSTANCE_COLUMNS)}, label)"
            )
        from smcli.checkpoint import load_model

        model = load_model(request.model)
    folder = request.output.parent if single else request.output
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"{folder}: cannot create output directory ({err.strerror})") from None

    def drawn(bag: BagValues) -> HeatmapResult:
        result = HeatmapResult(bag.source, bag.bag_id, warnings=list(bag.warnings))
        if request.labels and bag.labels is None:
            result.warnings.append(f"{bag.source}: {bag.bag_id}: no labels to outline")
        try:
            path = target_path(request.output, bag.bag_id)
            write_png(render(bag, request.norm, request.labels), path)
            result.written = path
        except (BagError, OutputError) as err:
            result.error = str(err)
        return result

    for table in tables:
        try:
            found = read_table(table, request.column, request.patch_size)
        except BagError as err:
            yield HeatmapResult(table, error=str(err))
            continue
        if single and len(found) > 1:
            raise UsageError(f"{table}: holds {len(found)} bags, one .png holds one; give a directory as -o")
        for bag in found:
            yield drawn(bag)
    options = ScoreOptions(request.keys, request.patch_size, request.dist_thr, "cpu")
    for path in bag_paths:
        try:
            bag = score_for_heatmap(path, model, request.column, options)
        except UsageError:
            raise
        except SmcliError as err:
            yield HeatmapResult(path, error=str(err))
            continue
        yield drawn(bag)
