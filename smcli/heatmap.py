"""Attention heatmaps as PNG, drawn with matplotlib: on the patch grid, or blended over the slide.

Inputs are scores tables written by `smcli score` (one bag or many: one PNG per bag_id) or bag files
scored on the spot with a model (smcli.scored). Each patch's value (a table column, attention_logit
by default) is normalized to [0, 1] (`--norm`) and coloured with a matplotlib colour map (`--cmap`).

* Without a slide, each patch fills its grid cell (`smcli.graph.grid_cells`), a whole number of
  pixels per cell (the longer side near 800 px). Cells without a patch show a grey checkerboard,
  a pattern no colour map produces, so "no patch" never reads as low attention.
* With `--slide`, the slide's thumbnail (longer side about `--max-side` px) gets every patch's
  true footprint blended in with `--alpha` (smcli.slide); areas without a patch keep the slide's
  pixels. `--top-patches K` also cuts the K highest-attention patches at level 0 and lays them out
  on a contact sheet.

matplotlib lays out the figure: a colour bar with ticks in the --norm's scale, a title with the bag
id and probability, a legend. The map itself is pasted into the rendered frame pixel for pixel (no
resampling) and the PNG is encoded once with Pillow: measured on a 2000 px slide overlay,
`figimage` + `savefig` took 3.3 s where drawing the frame and pasting takes ~0.3 s (2 busy cores).
matplotlib is an optional dependency (`pip install 'smcli[plot]'`), imported only in here.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from smcli.bags import BagKeys
from smcli.errors import BagError, OutputError, UsageError
from smcli.files import per_bag_target
from smcli.scored import BagValues, Failed, ValuesRequest, iter_values, on_level0, prepare_output
from smcli.slide import SlideFinder
from smcli.units import SHORT, check_mpp_flag

NORMS = ("raw", "minmax", "rank", "log")
DEFAULT_CMAP = "inferno"
TARGET_SIDE = 800  # pixels on the longer side of a grid map, give or take a cell's rounding
MAX_CELLS = 16_000_000  # 4000 x 4000 cells: far beyond any slide at a sane patch step
LUT_SIZE = 256  # colours per map, as matplotlib's own colour maps hold them

CHECKER = ((236, 236, 236), (206, 206, 206))  # "no patch": two light greys in 4-px squares
CHECKER_SQUARE = 4
OUTLINE = (0, 214, 255)  # cyan: the border of the label-1 patches
DPI = 100

PAD = 16  # figure geometry in pixels
TITLE_H = 52
BAR_GAP = 24
BAR_W = 22
TICK_W = 84
LEGEND_H = 34
MIN_BAR_H = 200
MIN_WIDTH = 420


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


def colour_map(name: str):
    """matplotlib's colour map `name`; UsageError listing a few when there is none of that name."""
    import matplotlib

    try:
        return matplotlib.colormaps[name]
    except KeyError:
        raise UsageError(
            f"unknown --cmap {name!r}: use a matplotlib colour map, e.g. inferno, magma, viridis, "
            "turbo, coolwarm, RdYlBu_r"
        ) from None


def lookup_table(cmap) -> np.ndarray:
    """(LUT_SIZE, 3) uint8: the colour map sampled at t = 0, 1/255, ..., 1."""
    rgba = cmap(np.linspace(0.0, 1.0, LUT_SIZE))  # (LUT_SIZE, 4) floats in [0, 1]
    return np.rint(rgba[:, :3] * 255).astype(np.uint8)


def colours(t: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """(…,) values in [0, 1] -> (…, 3) uint8, through the lookup table."""
    index = np.rint(np.clip(t, 0.0, 1.0) * (lut.shape[0] - 1)).astype(np.intp)
    return lut[index]


def checkerboard(height: int, width: int) -> np.ndarray:
    """(H, W, 3) uint8 grey checkerboard: the "no patch" pattern."""
    rows = (np.arange(height) // CHECKER_SQUARE)[:, None]
    cols = (np.arange(width) // CHECKER_SQUARE)[None, :]
    return np.asarray(CHECKER, dtype=np.uint8)[(rows + cols) % 2]


# --- the grid picture (no slide) ----------------------------------------------------------------


def grid_image(cells: np.ndarray, t: np.ndarray, nx: int, ny: int, cell: int, lut: np.ndarray) -> np.ndarray:
    """(ny*cell, nx*cell, 3) uint8: each occupied cell in its colour (the hottest of its patches),
    empty cells showing the checkerboard."""
    value = np.full((ny, nx), -1.0)
    np.maximum.at(value, (cells[:, 1], cells[:, 0]), t)  # the hottest patch of a cell shows
    value = np.repeat(np.repeat(value, cell, axis=0), cell, axis=1)  # (ny*cell, nx*cell)
    pixels = checkerboard(*value.shape)
    occupied = value >= 0
    pixels[occupied] = colours(value[occupied], lut)
    return pixels


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


@dataclass
class Picture:
    """A figure frame and its map: `render()` pastes the map at map_origin (left, top) into the frame."""

    figure: object
    map_origin: tuple[int, int]
    map_pixels: np.ndarray  # (H, W, 3) uint8 exactly as placed

    def render(self) -> np.ndarray:
        """(height, width, 3) uint8: the frame as matplotlib draws it, the map pasted in place."""
        canvas = self.figure.canvas  # type: ignore[attr-defined]
        canvas.draw()
        frame = np.asarray(canvas.buffer_rgba())[..., :3].copy()  # (height, width, 3)
        left, top = self.map_origin
        height, width = self.map_pixels.shape[:2]
        frame[top : top + height, left : left + width] = self.map_pixels
        return frame


def _finite(bag: BagValues) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    finite = np.isfinite(bag.values)
    if not finite.any():
        raise BagError(f"{bag.source}: {bag.bag_id}: no finite {bag.column} values to draw")
    labels = None if bag.labels is None else np.asarray(bag.labels)[finite]
    return np.asarray(bag.coords)[finite], bag.values[finite], labels


def render_grid(bag: BagValues, norm: str = "rank", outline: bool = False, cmap_name: str = DEFAULT_CMAP):
    """The patch-grid heatmap of one bag as a Picture (no slide needed)."""
    from smcli.graph import GraphError, grid_cells

    coords, values, labels = _finite(bag)
    where = f"{bag.source}: {bag.bag_id}"
    scale = normalize(values, norm, where)
    try:
        cells = grid_cells(coords, bag.patch_step)
    except GraphError as err:
        raise BagError(f"{where}: {err}") from None
    nx, ny = int(cells[:, 0].max()) + 1, int(cells[:, 1].max()) + 1
    if nx * ny > MAX_CELLS:  # a step far below the real one (e.g. inferred from jittered coords)
        raise BagError(
            f"{where}: a grid of {nx} x {ny} cells at patch step {bag.patch_step:g} "
            "is too large to draw; check --patch-size"
        )
    cell = max(1, TARGET_SIDE // max(nx, ny))
    cmap = colour_map(cmap_name)
    pixels = grid_image(cells, scale.t, nx, ny, cell, lookup_table(cmap))
    outlined = outline and labels is not None
    if outline and labels is not None:
        pixels[outline_mask(cells, labels, nx, ny, cell)] = OUTLINE
    unit = SHORT.get(bag.coords_units, bag.coords_units)
    subtitle = f"{bag.column}, {scale.caption}; {values.shape[0]} patches, step {bag.patch_step:g} {unit}"
    return compose(pixels, scale, cmap, _title(bag), subtitle, outlined, checker_legend=True)


def _title(bag: BagValues) -> str:
    return bag.bag_id if bag.probability is None else f"{bag.bag_id}    probability {bag.probability:.3f}"


def compose(
    pixels: np.ndarray,
    scale: Scale,
    cmap,
    title: str,
    subtitle: str,
    outlined: bool = False,
    checker_legend: bool = False,
) -> Picture:
    """A matplotlib figure: the map pixel for pixel at (PAD, TITLE_H), a colour bar with the scale's
    ticks to its right, title and subtitle above, a legend ("no patch", "label 1") below."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    map_h, map_w = pixels.shape[:2]
    bar_h = max(map_h, MIN_BAR_H)
    width = max(PAD + map_w + BAR_GAP + BAR_W + TICK_W + PAD, MIN_WIDTH)
    height = TITLE_H + bar_h + LEGEND_H + PAD
    figure = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, facecolor="white")
    FigureCanvasAgg(figure)
    figure.text(PAD / width, 1 - 10 / height, title, fontsize=12, va="top", ha="left")
    figure.text(PAD / width, 1 - 32 / height, subtitle, fontsize=9, va="top", ha="left", color="0.25")

    bar = figure.add_axes(
        (
            (PAD + map_w + BAR_GAP) / width,
            (height - TITLE_H - bar_h) / height,
            BAR_W / width,
            bar_h / height,
        )
    )
    colorbar = figure.colorbar(ScalarMappable(norm=Normalize(0.0, 1.0), cmap=cmap), cax=bar)
    colorbar.set_ticks([position for position, _ in scale.ticks])
    colorbar.set_ticklabels([label for _, label in scale.ticks])
    colorbar.ax.tick_params(labelsize=8)

    legend_bottom = height - TITLE_H - bar_h - 26  # pixels from the figure's bottom edge
    x = PAD
    if checker_legend:
        figure.figimage(checkerboard(14, 14), xo=x, yo=legend_bottom, origin="upper", resize=False)
        figure.text((x + 20) / width, (legend_bottom + 7) / height, "no patch", fontsize=9, va="center")
        x += 110
    if outlined:
        swatch = Rectangle(
            (x / width, legend_bottom / height),
            14 / width,
            14 / height,
            transform=figure.transFigure,
            fill=False,
            edgecolor=np.asarray(OUTLINE) / 255,
            linewidth=2.5,
        )
        figure.add_artist(swatch)
        figure.text((x + 20) / width, (legend_bottom + 7) / height, "label 1", fontsize=9, va="center")
    return Picture(figure, (PAD, TITLE_H), pixels)


# --- the picture on the slide ---------------------------------------------------------------------


def render_overlay(
    bag: BagValues, thumbnail, norm: str = "rank", cmap_name: str = DEFAULT_CMAP, alpha: float = 0.4
) -> Picture:
    """The bag's attention blended over its slide's thumbnail (smcli.slide.Thumbnail) as a Picture."""
    from smcli.slide import blend, check_inside, paint

    coords, values, _ = _finite(bag)
    where = f"{bag.source}: {bag.bag_id}"
    check_inside(coords, thumbnail.level0_size, where, thumbnail.path)
    scale = normalize(values, norm, where)
    cmap = colour_map(cmap_name)
    try:
        canvas = paint(coords, bag.patch_side, scale.t, thumbnail.pixels.shape[:2], thumbnail.scale)
    except BagError as err:
        raise BagError(f"{where}: {err}") from None
    pixels = blend(thumbnail.pixels, canvas, lookup_table(cmap), alpha)
    width, height = thumbnail.level0_size
    converted = f" (from µm at {bag.converted_at})" if bag.converted_at else ""
    subtitle = (
        f"{bag.column}, {scale.caption}; {values.shape[0]} patches of {bag.patch_step:.4g} px{converted} "
        f"on {thumbnail.path.name} ({width} x {height} px, shown 1:{thumbnail.scale[0]:.3g})"
    )
    return compose(pixels, scale, cmap, _title(bag), subtitle)


def top_patch_order(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest finite values, highest first (ties: earlier patch first)."""
    finite = np.flatnonzero(np.isfinite(values))
    order = finite[np.argsort(-values[finite], kind="stable")]
    return order[:k]


def contact_sheet(crops: list[np.ndarray], captions: list[str], title: str):
    """A matplotlib figure: the crops on a grid (at most 5 across), each captioned."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = min(5, len(crops))
    rows = -(-len(crops) // columns)
    figure = Figure(figsize=(2.4 * columns, 2.6 * rows + 0.5), dpi=DPI, facecolor="white")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    for ax, crop, caption in zip(axes.ravel(), crops, captions, strict=False):
        ax.imshow(crop, interpolation="antialiased")  # a 512 px crop shown at ~170 px
        ax.set_title(caption, fontsize=8)
    figure.suptitle(title, fontsize=11)
    return figure


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
    cmap: str = DEFAULT_CMAP
    slide: Path | None = None  # one slide file, or a directory of slides named by bag_id
    max_side: int = 2000
    alpha: float = 0.4
    top_patches: int | None = None
    mpp: float | None = None  # µm per level-0 pixel; overrides the slide's (micrometre coords only)


@dataclass
class HeatmapResult:
    """One bag drawn (written set, plus top-patch files) or failed (error set); warnings either way,
    and `notes` (the MPP used to place micrometre coords on the slide)."""

    source: Path
    bag_id: str | None = None
    written: Path | None = None
    error: str = ""
    warnings: list[str] = field(default_factory=list)
    top: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def target_path(output: Path, bag_id: str) -> Path:
    """OUT itself when it names a .png file; otherwise OUT/<bag_id>.png."""
    return per_bag_target(output, bag_id, ".png")


def save_figure(figure, path: Path) -> None:
    """savefig as PNG, atomically; OutputError when it cannot be written."""
    from smcli.files import atomic_path

    try:
        with atomic_path(path) as tmp:
            figure.savefig(tmp, format="png", dpi=DPI)
    except OSError as err:
        raise OutputError(f"{path}: cannot write ({err.strerror or type(err).__name__})") from None


def save_rgb(pixels: np.ndarray, path: Path) -> None:
    """(H, W, 3) uint8 as a PNG of exactly those pixels, atomically (Pillow)."""
    from PIL import Image

    from smcli.files import atomic_path

    try:
        with atomic_path(path) as tmp:
            Image.fromarray(pixels, "RGB").save(tmp, format="PNG")
    except OSError as err:
        raise OutputError(f"{path}: cannot write ({err.strerror or type(err).__name__})") from None


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError("drawing heatmaps needs matplotlib: pip install 'smcli[plot]'") from None


def check_request(request: HeatmapRequest) -> None:
    """UsageError for flags that cannot work, before anything is read or written."""
    if request.norm not in NORMS:
        raise UsageError(f"unknown --norm {request.norm!r}: use {', '.join(NORMS)}")
    require_matplotlib()
    colour_map(request.cmap)
    if not 0.0 <= request.alpha <= 1.0:
        raise UsageError(f"--alpha must be in [0, 1], got {request.alpha}")
    check_mpp_flag(request.mpp)
    if request.top_patches is not None:
        if request.slide is None:
            raise UsageError("--top-patches needs --slide: the patches are cut from the slide")
        if request.top_patches < 1:
            raise UsageError(f"--top-patches must be at least 1, got {request.top_patches}")
    if request.slide is not None:
        from smcli.slide import MAX_SIDE_LIMIT, require_openslide

        if not 0 < request.max_side <= MAX_SIDE_LIMIT:
            raise UsageError(f"--max-side must be in 1..{MAX_SIDE_LIMIT}, got {request.max_side}")
        require_openslide()
        if not request.slide.exists():
            raise UsageError(f"{request.slide}: no such slide file or directory")


def run_heatmap(request: HeatmapRequest) -> Iterator[HeatmapResult]:
    """Draw every bag of every input. Usage problems raise UsageError/ModelError before any output;
    a bag that cannot be read or drawn (its slide included) yields a result with `error`, and the
    others go on."""
    check_request(request)
    values_request = ValuesRequest(
        request.inputs,
        request.model,
        request.column,
        request.patch_size,
        request.dist_thr,
        request.keys,
        output=request.output,
        single_suffix=".png",
    )
    prepare_output(values_request)
    slide_for = None if request.slide is None else SlideFinder(request.slide)
    for item in iter_values(values_request):
        if isinstance(item, Failed):
            yield HeatmapResult(item.source, error=item.error)
            continue
        result = HeatmapResult(item.source, item.bag_id, warnings=list(item.warnings))
        try:
            slide_path = (
                None if slide_for is None else slide_for(item.bag_id, f"{item.source}: {item.bag_id}")
            )
            draw_bag(item, request, result, slide_path)
        except (BagError, OutputError) as err:
            result.error = str(err)
        yield result


def draw_bag(
    bag: BagValues, request: HeatmapRequest, result: HeatmapResult, slide_path: Path | None = None
) -> None:
    """Write one bag's PNG (and its top patches); fills result.written / result.top."""
    path = target_path(request.output, bag.bag_id)
    if slide_path is None:
        if request.labels and bag.labels is None:
            result.warnings.append(f"{bag.source}: {bag.bag_id}: no labels to outline")
        picture = render_grid(bag, request.norm, request.labels, request.cmap)
        save_rgb(picture.render(), path)
        result.written = path
        return
    from smcli.slide import read_thumbnail

    if request.labels:
        result.warnings.append(f"{bag.source}: {bag.bag_id}: --labels outlines the grid picture only")
    thumbnail = read_thumbnail(slide_path, request.max_side)
    bag, note = on_level0(bag, request.mpp, thumbnail.mpp, slide_path.name)
    if note:
        result.notes.append(note)
    picture = render_overlay(bag, thumbnail, request.norm, request.cmap, request.alpha)
    save_rgb(picture.render(), path)
    result.written = path
    if request.top_patches:
        result.top = write_top_patches(bag, slide_path, path.with_suffix(""), request.top_patches)


def write_top_patches(bag: BagValues, slide_path: Path, base: Path, k: int) -> list[Path]:
    """The k highest-attention patches cut from the slide at level 0 (bag.patch_step px):
    `<base>_top/rank_001_instance_<i>.png` ..., and the contact sheet `<base>_top.png`."""
    from smcli.slide import read_patches

    chosen = top_patch_order(bag.values, k)
    step = int(round(bag.patch_step))
    crops = read_patches(slide_path, np.asarray(bag.coords)[chosen], step)
    folder = base.with_name(f"{base.name}_top")
    try:
        folder.mkdir(exist_ok=True)
    except OSError as err:
        raise OutputError(f"{folder}: cannot create directory ({err.strerror})") from None
    instances = bag.instance_ids[chosen]
    weights = bag.scores.get("attention_weight")
    written, captions = [], []
    for rank, (index, instance, crop) in enumerate(zip(chosen, instances, crops, strict=True), start=1):
        path = folder / f"rank_{rank:03d}_instance_{int(instance)}.png"
        save_rgb(crop, path)
        written.append(path)
        shown = (
            f"weight {weights[index]:.3g}" if weights is not None else f"{bag.column} {bag.values[index]:.3g}"
        )
        captions.append(f"#{rank}  instance {int(instance)}\n{shown}")
    sheet = base.with_name(f"{base.name}_top.png")
    title = f"{bag.bag_id}: top {len(crops)} patches by {bag.column} ({step} px at level 0)"
    save_figure(contact_sheet(crops, captions, title), sheet)
    return [*written, sheet]
