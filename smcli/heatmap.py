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
from smcli.files import per_bag_target, prepare_file_output
from smcli.scored import BagValues, Failed, ValuesRequest, iter_values, on_level0, prepare_output
from smcli.slide import SlideFinder, border
from smcli.units import SHORT, check_mpp_flag, mpp_from_properties

NORMS = ("raw", "minmax", "rank", "log")
DEFAULT_CMAP = "inferno"
TARGET_SIDE = 800  # pixels on the longer side of a grid map, give or take a cell's rounding
MAX_CELLS = 16_000_000  # 4000 x 4000 cells: far beyond any slide at a sane patch step
LUT_SIZE = 256  # colours per map, as matplotlib's own colour maps hold them

CHECKER = ((236, 236, 236), (206, 206, 206))  # "no patch": two light greys in 4-px squares
CHECKER_SQUARE = 4
OUTLINE = (0, 214, 255)  # cyan: the border of the label-1 patches
TOP_FRACTION = 0.9  # the top tenth of the colour scale is outlined on the slide (rank: top decile)
TOP_OUTLINE = (255, 255, 255)  # white, with a black ring outside it: visible on any stain or colour
TOP_HALO = (0, 0, 0)
OPACITY_LOW, OPACITY_HIGH = 0.15, 0.9  # default overlay opacity at the bottom and top of the scale
DPI = 100

PAD = 16  # figure geometry in pixels
TITLE_H = 52
BAR_GAP = 24
BAR_W = 22
TICK_W = 84
LABEL_W = 20  # the colour bar's own label, rotated
LEGEND_H = 34
MIN_BAR_H = 200
MIN_WIDTH = 420


@dataclass(frozen=True)
class Scale:
    """Values mapped to [0, 1], and the colour bar's ticks: (position in [0, 1], label).

    caption: the subtitle's words; bar_label: what the colour bar says it shows (whether the scale
    is this bag's own or one fixed for every bag); top_label: what t >= TOP_FRACTION means.
    """

    t: np.ndarray
    ticks: list[tuple[float, str]]
    caption: str
    bar_label: str = ""
    top_label: str = ""


def check_scale(norm: str, vmin: float | None, vmax: float | None) -> None:
    """UsageError unless --norm is known and --vmin/--vmax come together, with --norm raw, vmin < vmax.

    Shared by every command that draws a colour scale (heatmap, view).
    """
    import math

    if norm not in NORMS:
        raise UsageError(f"unknown --norm {norm!r}: use {', '.join(NORMS)}")
    if vmin is None and vmax is None:
        return
    if vmin is None or vmax is None:
        raise UsageError("--vmin and --vmax go together: one fixed scale needs both ends")
    if norm != "raw":
        raise UsageError(f"--vmin/--vmax fix a raw scale: add --norm raw (not {norm})")
    if not (math.isfinite(vmin) and math.isfinite(vmax) and vmin < vmax):
        raise UsageError(f"--vmin must be below --vmax (both finite), got {vmin:g} and {vmax:g}")


def normalize(
    values: np.ndarray, norm: str, where: str = "", vmin: float | None = None, vmax: float | None = None
) -> Scale:
    """(N,) finite values -> Scale. `where` names the data in errors (log of non-positive values).

    rank, minmax, log and plain raw are this bag's own scale (a negative slide's top patches are as
    hot as a positive slide's); raw with vmin and vmax is one fixed scale, values beyond it clipped
    to its ends: the same colour means the same value in every bag.
    """
    values = np.asarray(values, dtype=np.float64)
    fractions = (0.0, 0.25, 0.5, 0.75, 1.0)
    if norm == "raw" and vmin is not None and vmax is not None:
        check_scale(norm, vmin, vmax)
        t = np.clip((values - vmin) / (vmax - vmin), 0.0, 1.0)
        ticks = [(f, f"{vmin + f * (vmax - vmin):.3g}") for f in fractions]
        top = vmin + TOP_FRACTION * (vmax - vmin)
        return Scale(
            t,
            ticks,
            f"raw values, fixed scale {vmin:g} to {vmax:g}",
            "raw value, fixed scale (same in every bag)",
            f"value ≥ {top:.3g}",
        )
    if norm == "rank":
        import pandas as pd

        ranks = pd.Series(values).rank(method="average").to_numpy()
        t = (ranks - 1.0) / (len(values) - 1) if len(values) > 1 else np.ones_like(values)
        return Scale(
            t,
            [(f, f"{f * 100:.0f}%") for f in fractions],
            "percentile rank within this bag",
            "rank within this bag (not comparable across bags)",
            "top 10% of this bag's patches",
        )
    if norm == "log":
        bad = int((values <= 0).sum())
        if bad:
            raise UsageError(
                f"{where}: --norm log needs positive values; {bad} of {len(values)} are <= 0 "
                "(attention_weight is always positive)"
            )
        logs = np.log10(values)
        t, lo, hi = _stretch(logs)
        top = 10 ** (lo + TOP_FRACTION * (hi - lo))
        return Scale(
            t,
            [(f, f"{10 ** (lo + f * (hi - lo)):.3g}") for f in fractions],
            "log scale, this bag's range",
            "log value, this bag's min to max",
            f"value ≥ {top:.3g}",
        )
    if norm not in ("raw", "minmax"):
        raise UsageError(f"unknown --norm {norm!r}: use {', '.join(NORMS)}")
    t, lo, hi = _stretch(values)
    top = lo + TOP_FRACTION * (hi - lo)
    if norm == "minmax":
        return Scale(
            t,
            [(f, f"{f:g}") for f in fractions],
            "min-max scaled within this bag",
            "this bag's min (0) to max (1)",
            f"value ≥ {top:.3g}",
        )
    return Scale(
        t,
        [(f, f"{lo + f * (hi - lo):.3g}") for f in fractions],
        "raw values, this bag's range",
        "raw value, this bag's min to max",
        f"value ≥ {top:.3g}",
    )


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
    return border(region, width)


def outer_ring(region: np.ndarray) -> np.ndarray:
    """(H, W) bool: the pixels just outside `region` (4-neighbours of it, not in it)."""
    grown = region.copy()
    grown[1:] |= region[:-1]
    grown[:-1] |= region[1:]
    grown[:, 1:] |= region[:, :-1]
    grown[:, :-1] |= region[:, 1:]
    return grown & ~region


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


def render_grid(
    bag: BagValues,
    norm: str = "rank",
    outline: bool = False,
    cmap_name: str = DEFAULT_CMAP,
    vmin: float | None = None,
    vmax: float | None = None,
):
    """The patch-grid heatmap of one bag as a Picture (no slide needed)."""
    from smcli.graph import GraphError, grid_cells

    coords, values, labels = _finite(bag)
    where = f"{bag.source}: {bag.bag_id}"
    scale = normalize(values, norm, where, vmin, vmax)
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
    legend = [CHECKER_SWATCH] + ([(OUTLINE, None, label_legend(labels))] if outlined else [])
    return compose(pixels, scale, cmap, _title(bag), subtitle, legend)


def label_legend(labels: np.ndarray | None) -> str:
    """The legend text of the label outline: says so when the bag has no label-1 patch to outline."""
    return "label 1" if labels is not None and np.asarray(labels).any() else "label 1 (none in this bag)"


def _title(bag: BagValues) -> str:
    return bag.bag_id if bag.probability is None else f"{bag.bag_id}    probability {bag.probability:.3f}"


CHECKER_SWATCH = (None, None, "no patch")  # a legend entry drawn as the checkerboard


def compose(
    pixels: np.ndarray,
    scale: Scale,
    cmap,
    title: str,
    subtitle: str,
    legend: list[tuple] = (),  # type: ignore[assignment]
) -> Picture:
    """A matplotlib figure: the map pixel for pixel at (PAD, TITLE_H), a colour bar with the scale's
    ticks and label (`scale.bar_label`) to its right, title and subtitle above, and a legend below:
    entries (edge colour, halo colour or None, text), or CHECKER_SWATCH for "no patch"."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    map_h, map_w = pixels.shape[:2]
    bar_h = max(map_h, MIN_BAR_H)
    width = max(PAD + map_w + BAR_GAP + BAR_W + TICK_W + LABEL_W + PAD, MIN_WIDTH)
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
    if scale.bar_label:
        colorbar.set_label(scale.bar_label, fontsize=8)

    legend_bottom = height - TITLE_H - bar_h - 26  # pixels from the figure's bottom edge
    x = PAD
    for edge, halo, text in legend:
        if edge is None:
            figure.figimage(checkerboard(14, 14), xo=x, yo=legend_bottom, origin="upper", resize=False)
        else:
            for colour, line in ((halo, 4.5), (edge, 2.0)) if halo is not None else ((edge, 2.5),):
                figure.add_artist(
                    Rectangle(
                        (x / width, legend_bottom / height),
                        14 / width,
                        14 / height,
                        transform=figure.transFigure,
                        fill=False,
                        edgecolor=np.asarray(colour) / 255,
                        linewidth=line,
                    )
                )
        figure.text((x + 20) / width, (legend_bottom + 7) / height, text, fontsize=9, va="center")
        x += 20 + 7 * len(text) + 24  # about 7 px per character at 9 pt
    return Picture(figure, (PAD, TITLE_H), pixels)


# --- the picture on the slide ---------------------------------------------------------------------


@dataclass(frozen=True)
class OverlayStyle:
    """How attention is drawn over a slide (shared by heatmap and view).

    alpha None: opacity rising with the value (OPACITY_LOW at the bottom of the scale, OPACITY_HIGH
    at the top), so high attention stays the most visible thing on any stain; a number: that one
    opacity everywhere. top_outline: a white line with a black ring around the patches in the top
    tenth of the scale. labels: a cyan line around the label-1 patches.
    """

    norm: str = "rank"
    cmap: str = DEFAULT_CMAP
    alpha: float | None = None
    vmin: float | None = None
    vmax: float | None = None
    top_outline: bool = False
    labels: bool = False


def render_overlay(bag: BagValues, thumbnail, style: OverlayStyle = OverlayStyle()) -> Picture:
    """The bag's attention over its slide's thumbnail (smcli.slide.Thumbnail) as a Picture.

    bag: coords and patch step in level-0 pixels (smcli.scored.on_level0); the thumbnail may show a
    box of the slide (smcli.slide.crop_box): patches are painted relative to its origin.
    """
    from smcli.slide import blend, check_inside, opacity_ramp, paint

    coords, values, labels = _finite(bag)
    where = f"{bag.source}: {bag.bag_id}"
    check_inside(coords, thumbnail.level0_size, where, thumbnail.path)
    scale = normalize(values, style.norm, where, style.vmin, style.vmax)
    cmap = colour_map(style.cmap)
    shape = thumbnail.pixels.shape[:2]
    local = np.asarray(coords, dtype=np.float64) - np.asarray(thumbnail.origin)  # (N, 2) in the box
    try:
        canvas = paint(local, bag.patch_side, scale.t, shape, thumbnail.scale)
        labelled = None
        if style.labels and labels is not None and labels.any():
            positive = np.asarray(labels, dtype=bool)
            ones = np.ones(int(positive.sum()))
            labelled = paint(local[positive], bag.patch_side, ones, shape, thumbnail.scale) >= 0
    except BagError as err:
        raise BagError(f"{where}: {err}") from None
    lut = lookup_table(cmap)
    alpha = opacity_ramp(LUT_SIZE, OPACITY_LOW, OPACITY_HIGH) if style.alpha is None else style.alpha
    pixels = blend(thumbnail.pixels, canvas, lut, alpha)
    legend: list[tuple] = []
    line = max(1, round(max(shape) / 500))  # outline width: visible at 500-2000 px
    if style.top_outline:
        top = canvas >= TOP_FRACTION
        if top.any():
            edge = border(top, line)
            pixels[outer_ring(top | edge)] = TOP_HALO
            pixels[edge] = TOP_OUTLINE
            legend.append((TOP_OUTLINE, TOP_HALO, scale.top_label))
    if labelled is not None:
        pixels[border(labelled, line)] = OUTLINE
    if style.labels and labels is not None:
        legend.append((OUTLINE, None, label_legend(labels)))
    width, height = thumbnail.level0_size
    converted = f" (from µm at {bag.converted_at})" if bag.converted_at else ""
    opacity = "" if style.alpha is None else f", opacity {style.alpha:g}"
    x0, y0 = (round(v) for v in thumbnail.origin)
    shown_w, shown_h = (round(v * n) for v, n in zip(thumbnail.scale, shape[::-1], strict=True))
    if thumbnail.region is None:
        region = f"{thumbnail.path.name} ({width} x {height} px)"
    else:
        region = f"{thumbnail.path.name} x {x0}-{x0 + shown_w}, y {y0}-{y0 + shown_h}"
    subtitle = (
        f"{bag.column}, {scale.caption}{opacity}; {values.shape[0]} patches of {bag.patch_step:.4g} px"
        f"{converted}; {region}"
    )
    return compose(pixels, scale, cmap, _title(bag), subtitle, legend)


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
    figure = Figure(figsize=(2.4 * columns, 2.8 * rows + 0.5), dpi=DPI, facecolor="white")
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
    alpha: float | None = None  # None: opacity rising with the value (OverlayStyle)
    top_patches: int | None = None
    mpp: float | None = None  # µm per level-0 pixel; overrides the slide's (micrometre coords only)
    overwrite: bool = False  # replace existing pictures (else that bag's error)
    vmin: float | None = None  # with --norm raw: one fixed scale for every bag
    vmax: float | None = None
    crop: bool = True  # draw the patches' bounding box plus a margin, not the whole slide
    top_outline: bool = False

    @property
    def style(self) -> OverlayStyle:
        return OverlayStyle(
            self.norm, self.cmap, self.alpha, self.vmin, self.vmax, self.top_outline, self.labels
        )


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
    check_scale(request.norm, request.vmin, request.vmax)
    require_matplotlib()
    colour_map(request.cmap)
    if request.alpha is not None and not 0.0 <= request.alpha <= 1.0:
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
        picture = render_grid(bag, request.norm, request.labels, request.cmap, request.vmin, request.vmax)
        claim_outputs(path, request)
        save_rgb(picture.render(), path)
        result.written = path
        return
    from smcli.slide import check_inside, crop_box, open_slide, read_thumbnail

    if request.labels and bag.labels is None:
        result.warnings.append(f"{bag.source}: {bag.bag_id}: no labels to outline")
    with open_slide(slide_path) as handle:  # the MPP and size first: the crop is in level-0 pixels
        slide_mpp = mpp_from_properties(handle.properties)
        level0_size = (int(handle.dimensions[0]), int(handle.dimensions[1]))
    bag, note = on_level0(bag, request.mpp, slide_mpp, slide_path.name)
    if note:
        result.notes.append(note)
    box = None
    if request.crop:
        coords = np.asarray(_finite(bag)[0], dtype=np.float64)
        check_inside(coords, level0_size, f"{bag.source}: {bag.bag_id}", slide_path)
        box = crop_box(coords, bag.patch_side, level0_size)
    thumbnail = read_thumbnail(slide_path, request.max_side, box)
    picture = render_overlay(bag, thumbnail, request.style)
    claim_outputs(path, request)
    save_rgb(picture.render(), path)
    result.written = path
    if request.top_patches:
        result.top = write_top_patches(bag, slide_path, path.with_suffix(""), request.top_patches)


def claim_outputs(path: Path, request: HeatmapRequest) -> None:
    """The output rule (files.prepare_file_output) for a bag's picture and its top-patch sheet."""
    prepare_file_output(path, request.overwrite)
    if request.top_patches:
        prepare_file_output(path.with_name(f"{path.stem}_top.png"), request.overwrite)


def write_top_patches(bag: BagValues, slide_path: Path, base: Path, k: int) -> list[Path]:
    """The k highest-attention patches cut from the slide at level 0 (bag.patch_step px):
    `<base>_top/rank_001_instance_<i>_x<x>_y<y>.png` ... (x, y: the patch's level-0 corner, so a crop
    can be found again on the slide), and the contact sheet `<base>_top.png`, captioned alike."""
    from smcli.slide import read_patches

    chosen = top_patch_order(bag.values, k)
    step = int(round(bag.patch_step))
    corners = np.rint(np.asarray(bag.coords, dtype=np.float64)[chosen]).astype(np.int64)  # (k, 2) level 0
    crops = read_patches(slide_path, corners, step)
    folder = base.with_name(f"{base.name}_top")
    try:
        folder.mkdir(exist_ok=True)
    except OSError as err:
        raise OutputError(f"{folder}: cannot create directory ({err.strerror})") from None
    instances = bag.instance_ids[chosen]
    weights = bag.scores.get("attention_weight")
    written, captions = [], []
    for rank, (index, instance, crop, (x, y)) in enumerate(
        zip(chosen, instances, crops, corners.tolist(), strict=True), start=1
    ):
        path = folder / f"rank_{rank:03d}_instance_{int(instance)}_x{x}_y{y}.png"
        save_rgb(crop, path)
        written.append(path)
        shown = (
            f"weight {weights[index]:.3g}" if weights is not None else f"{bag.column} {bag.values[index]:.3g}"
        )
        captions.append(f"#{rank}  instance {int(instance)}\nx {x}, y {y}\n{shown}")
    sheet = base.with_name(f"{base.name}_top.png")
    title = f"{bag.bag_id}: top {len(crops)} patches by {bag.column} ({step} px at level 0)"
    save_figure(contact_sheet(crops, captions, title), sheet)
    return [*written, sheet]
