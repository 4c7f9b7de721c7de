"""`smcli heatmap --slide`: attention blended over real tiled TIFF slides (written here with tifffile,
read back by OpenSlide), the top patches cut at level 0, and the slide errors."""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import pytest
import tifffile
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from smcli.cli import app
from smcli.heatmap import PAD, TITLE_H, colour_map, lookup_table, normalize
from smcli.slide import blend, find_slide, paint, read_thumbnail

runner = CliRunner()
STEP = 64
WIDTH, HEIGHT = 1600, 1200  # level 0 of the test slide
LUT = lookup_table(colour_map("inferno"))


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def write_tiff(path, rgb: np.ndarray, levels: int = 3, tile: int = 256):
    """A pyramidal tiled TIFF as OpenSlide reads generic TIFFs: deflate tiles, level 0 then each
    2x reduction as its own page marked subfiletype=1 (reduced-resolution image)."""
    with tifffile.TiffWriter(path) as tif:
        level = rgb
        for index in range(levels):
            tif.write(
                level, tile=(tile, tile), compression="zlib", photometric="rgb", subfiletype=1 if index else 0
            )
            h, w = level.shape[0] // 2 * 2, level.shape[1] // 2 * 2
            level = level[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3)).round().astype(np.uint8)
    return path


def slide_pixels(seed: int = 0) -> np.ndarray:
    """(HEIGHT, WIDTH, 3) uint8: a pinkish noisy texture, different in every pixel."""
    rng = np.random.default_rng(seed)
    base = np.array([225, 170, 200], dtype=np.int16)
    noise = rng.integers(-30, 30, size=(HEIGHT, WIDTH, 3), dtype=np.int16)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def patch_table(path, bag_id="a", seed=1):
    """Patches on a STEP grid covering x in [256, 1024), y in [128, 640); the rest has none."""
    cells = np.array([(x, y) for x in range(12) for y in range(8)])
    coords = cells * STEP + np.array([256, 128])
    logits = np.random.default_rng(seed).standard_normal(len(cells))
    weights = np.exp(logits) / np.exp(logits).sum()
    frame = pd.DataFrame(
        {
            "bag_id": bag_id,
            "instance": np.arange(len(cells)),
            "x": coords[:, 0],
            "y": coords[:, 1],
            "attention_logit": logits,
            "attention_weight": weights,
        }
    )
    frame.to_csv(path, index=False)
    return frame


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    folder = tmp_path_factory.mktemp("slide")
    pixels = slide_pixels()
    return write_tiff(folder / "a.tif", pixels), pixels


def map_of(path, shape) -> np.ndarray:
    image = np.asarray(Image.open(path).convert("RGB"))
    return image[TITLE_H : TITLE_H + shape[0], PAD : PAD + shape[1]]


def test_overlay_colours_the_footprints_and_keeps_the_slide_elsewhere(tmp_path, slide):
    slide_path, _ = slide
    frame = patch_table(tmp_path / "a.csv")
    out = tmp_path / "a.png"
    args = ("--slide", slide_path, "--max-side", 800, "--no-crop", "--alpha", 0.4)  # one fixed opacity
    result = invoke("heatmap", tmp_path / "a.csv", "-o", out, *args)
    assert result.exit_code == 0, result.stderr
    assert result.stderr.strip() == f"smcli: wrote {out}"

    # longer side = --max-side: level 0 is 1600 x 1200, so the thumbnail is the TIFF's level 1 as written
    thumb = tifffile.imread(slide_path, key=1).astype(np.float64)
    assert thumb.shape == (600, 800, 3)
    drawn = map_of(out, thumb.shape).astype(np.float64)
    # no patch outside x in [128, 512), y in [64, 320) of the thumbnail: the slide, untouched
    covered = np.zeros(thumb.shape[:2], dtype=bool)
    covered[64:320, 128:512] = True
    np.testing.assert_array_equal(drawn[~covered], thumb[~covered])
    # inside, 0.6 * slide + 0.4 * colour of each patch's rank, on its 32 x 32 px footprint
    t = normalize(frame["attention_logit"].to_numpy(), "rank").t
    for row, value in zip(frame.itertuples(), t, strict=True):
        x0, y0 = row.x // 2, row.y // 2
        expected = np.rint(0.6 * thumb[y0 : y0 + 32, x0 : x0 + 32] + 0.4 * LUT[round(value * 255)])
        np.testing.assert_array_equal(drawn[y0 : y0 + 32, x0 : x0 + 32], expected)
    hottest = frame.loc[frame["attention_logit"].idxmax()]
    box = drawn[hottest.y // 2 : hottest.y // 2 + 32, hottest.x // 2 : hottest.x // 2 + 32]
    assert not np.array_equal(
        box, thumb[hottest.y // 2 : hottest.y // 2 + 32, hottest.x // 2 : hottest.x // 2 + 32]
    )


def test_alpha_and_patch_size_change_the_footprint(tmp_path, slide):
    slide_path, _ = slide
    frame = patch_table(tmp_path / "a.csv")
    out = tmp_path / "a.png"
    args = ("--slide", slide_path, "--max-side", 800, "--alpha", 1, "--patch-size", 32, "--cmap", "viridis")
    args = (*args, "--no-crop")
    result = invoke("heatmap", tmp_path / "a.csv", "-o", out, *args)
    assert result.exit_code == 0, result.stderr
    drawn = map_of(out, (600, 800, 3))
    viridis = lookup_table(colour_map("viridis"))
    t = normalize(frame["attention_logit"].to_numpy(), "rank").t
    row, value = frame.iloc[5], t[5]
    x0, y0 = row.x // 2, row.y // 2
    assert (drawn[y0 : y0 + 16, x0 : x0 + 16] == viridis[round(value * 255)]).all()  # opaque, 16 px
    thumb = tifffile.imread(slide_path, key=1)
    np.testing.assert_array_equal(
        drawn[y0 + 16 : y0 + 32, x0 : x0 + 32], thumb[y0 + 16 : y0 + 32, x0 : x0 + 32]
    )


def test_a_slide_without_a_pyramid_is_read_in_bands(tmp_path, slide, monkeypatch):
    """Band by band (bounded memory) gives the same thumbnail as all at once, and is the 2x box mean."""
    import smcli.slide

    _, pixels = slide
    flat = write_tiff(tmp_path / "flat.tif", pixels, levels=1)
    whole = read_thumbnail(flat, 800)
    monkeypatch.setattr(smcli.slide, "READ_PIXELS", WIDTH * 50)  # 50-row bands: 24 read_region calls
    banded = read_thumbnail(flat, 800)
    np.testing.assert_array_equal(banded.pixels, whole.pixels)
    assert banded.level0_size == (WIDTH, HEIGHT) and banded.scale == (2.0, 2.0)
    box_mean = pixels.reshape(HEIGHT // 2, 2, WIDTH // 2, 2, 3).astype(np.float64).mean(axis=(1, 3))
    assert np.abs(banded.pixels - box_mean).max() <= 1  # Pillow's reduce rounds


def test_top_patches_are_the_slides_own_pixels(tmp_path, slide, monkeypatch):
    import smcli.heatmap

    sheets = []
    draw_sheet = smcli.heatmap.contact_sheet
    monkeypatch.setattr(
        smcli.heatmap, "contact_sheet", lambda *args: sheets.append(args) or draw_sheet(*args)
    )
    slide_path, _ = slide
    frame = patch_table(tmp_path / "a.csv")
    out = tmp_path / "maps"
    result = invoke("heatmap", tmp_path / "a.csv", "-o", out, "--slide", slide_path, "--top-patches", 4)
    assert result.exit_code == 0, result.stderr
    level0 = tifffile.imread(slide_path, level=0)  # read back independently of OpenSlide
    top = frame.sort_values("attention_logit", ascending=False, kind="stable").head(4)
    names = [  # the level-0 corner in the name: a crop can be found again on the slide
        f"rank_{rank:03d}_instance_{row.instance}_x{row.x}_y{row.y}.png"
        for rank, row in enumerate(top.itertuples(), 1)
    ]
    assert sorted(p.name for p in (out / "a_top").iterdir()) == sorted(names)
    for name, row in zip(names, top.itertuples(), strict=True):
        crop = np.asarray(Image.open(out / "a_top" / name))
        assert crop.shape == (STEP, STEP, 3)
        np.testing.assert_array_equal(crop, level0[row.y : row.y + STEP, row.x : row.x + STEP])
    sheet = Image.open(out / "a_top.png")
    assert sheet.size[0] >= 4 * 100 and "wrote 4 top patches" in result.stderr
    ((crops, captions, title),) = (
        sheets  # the sheet shows those crops, captioned rank, instance, x, y, weight
    )
    for crop, name in zip(crops, names, strict=True):
        np.testing.assert_array_equal(crop, np.asarray(Image.open(out / "a_top" / name)))
    assert captions == [
        f"#{rank}  instance {row.instance}\nx {row.x}, y {row.y}\nweight {row.attention_weight:.3g}"
        for rank, row in enumerate(top.itertuples(), 1)
    ]
    assert title == "a: top 4 patches by attention_logit (64 px at level 0)"


def test_slide_directory_finds_each_bag_and_names_the_one_without(tmp_path, slide):
    slide_path, pixels = slide
    slides = tmp_path / "slides"
    slides.mkdir()
    (slides / "a.tif").write_bytes(slide_path.read_bytes())
    (slides / "a_notes.txt").write_text("not a slide")
    both = pd.concat([patch_table(tmp_path / "x.csv", "a"), patch_table(tmp_path / "y.csv", "b")])
    both.to_csv(tmp_path / "both.csv", index=False)
    out = tmp_path / "maps"
    result = invoke("heatmap", tmp_path / "both.csv", "-o", out, "--slide", slides, "--max-side", 400)
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert lines == [
        f"smcli: wrote {out / 'a.png'}",
        f"error: {slides}: no slide for bag 'b' (looked for b.<extension>)",
    ]
    assert find_slide(slides, "a") == slides / "a.tif"


def test_one_slide_file_serves_one_bag(tmp_path, slide):
    slide_path, _ = slide
    both = pd.concat([patch_table(tmp_path / "x.csv", "a"), patch_table(tmp_path / "y.csv", "b")])
    both.to_csv(tmp_path / "both.csv", index=False)
    out = tmp_path / "maps"
    result = invoke("heatmap", tmp_path / "both.csv", "-o", out, "--slide", slide_path, "--max-side", 400)
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        f"smcli: wrote {out / 'a.png'}",
        f"error: {tmp_path / 'both.csv'}: b: --slide {slide_path} is the slide of a; "
        "give a directory of slides to draw several bags",
    ]


coordinate = st.one_of(
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1599, 1600, 1199, 1200, -1]),
)


@settings(max_examples=40, deadline=None)
@given(
    points=st.lists(st.tuples(coordinate, coordinate), min_size=1, max_size=6),
    patch_size=st.one_of(st.none(), st.floats(0.01, 1e7)),
)
def test_any_table_on_a_slide_draws_or_fails_in_one_line(tmp_path_factory, slide, points, patch_size):
    """Junk coords (negative, huge, NaN, inf, off-grid) and any step: a PNG or one error line, exit 0/1."""
    slide_path, _ = slide
    folder = tmp_path_factory.mktemp("fuzz")
    frame = pd.DataFrame(points, columns=["x", "y"]).assign(attention_logit=np.arange(len(points)) * 0.5)
    frame.to_csv(folder / "t.csv", index=False)
    extra = [] if patch_size is None else ["--patch-size", repr(patch_size)]
    result = invoke(
        "heatmap", folder / "t.csv", "-o", folder / "t.png", "--slide", slide_path, "--max-side", 300, *extra
    )
    lines = result.stderr.strip().splitlines()
    assert result.exit_code in (0, 1) and len(lines) == 1, result.stderr
    if result.exit_code == 0:
        assert lines[0] == f"smcli: wrote {folder / 't.png'}"
        assert (np.asarray(frame[["x", "y"]]) >= 0).all() and Image.open(folder / "t.png").size[0] > 300
    else:
        assert lines[0].startswith(f"error: {folder / 't.csv'}: ") and not (folder / "t.png").exists()


@pytest.mark.parametrize(
    "case, exit_code, message",
    [
        ("missing", 2, "{slide}: no such slide file or directory"),
        ("unreadable", 1, "{slide}: cannot read as a slide ("),
        ("outside", 1, "{table}: a: 96 of 96 patches lie outside slide {slide} (1600 x 1200 px at level 0;"),
        ("no_extra", 2, "reading slides needs OpenSlide: pip install 'smcli[slide]'"),
        ("alpha", 2, "--alpha must be in [0, 1], got 1.5"),
        ("top_without_slide", 2, "--top-patches needs --slide: the patches are cut from the slide"),
        ("max_side", 2, "--max-side must be in 1..20000, got 0"),
    ],
)
def test_slide_errors_are_one_line_with_their_exit_code(
    tmp_path, slide, monkeypatch, case, exit_code, message
):
    slide_path, _ = slide
    table = tmp_path / "a.csv"
    frame = patch_table(table)
    args = ["--slide", slide_path]
    if case == "missing":
        slide_path = tmp_path / "nowhere.svs"
        args = ["--slide", slide_path]
    elif case == "unreadable":
        slide_path = tmp_path / "a.svs"
        slide_path.write_bytes(b"II*\x00 not really a tiff")
        args = ["--slide", slide_path]
    elif case == "outside":
        frame.assign(x=frame.x + 2000).to_csv(table, index=False)
    elif case == "no_extra":
        monkeypatch.setitem(sys.modules, "openslide", None)
    elif case == "alpha":
        args += ["--alpha", "1.5"]
    elif case == "top_without_slide":
        args = ["--top-patches", "3"]
    elif case == "max_side":
        args += ["--max-side", "0"]
    out = tmp_path / "maps"
    result = invoke("heatmap", table, "-o", out, *args)
    assert result.exit_code == exit_code
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: " + message.format(slide=slide_path, table=table)), lines[0]
    assert not (out / "a.png").exists()


def reference_paint(coords, step, t, shape, scale):
    """A per-patch paint loop, the obvious way: each patch fills its rounded box with max()."""
    canvas = np.full(shape, -1.0, dtype=np.float32)
    sx, sy = scale
    for (x, y), value in zip(coords, t, strict=True):
        x0, y0 = (
            min(int(np.floor(x / sx + 0.5)), shape[1] - 1),
            min(int(np.floor(y / sy + 0.5)), shape[0] - 1),
        )
        x1 = max(min(int(np.floor((x + step) / sx + 0.5)), shape[1]), x0 + 1)
        y1 = max(min(int(np.floor((y + step) / sy + 0.5)), shape[0]), y0 + 1)
        box = canvas[y0:y1, x0:x1]
        np.maximum(box, np.float32(value), out=box)
    return canvas


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 40),
    step=st.floats(8, 400),
    scale=st.tuples(st.floats(0.5, 12), st.floats(0.5, 12)),
    seed=st.integers(0, 2**16),
)
def test_vectorized_painting_equals_a_per_patch_loop(n, step, scale, seed):
    """Any patches (overlapping, off-grid, tiny or huge footprints): same canvas as the loop."""
    rng = np.random.default_rng(seed)
    shape = (50, 70)
    coords = rng.uniform(0, 1, size=(n, 2)) * np.array([70 * scale[0], 50 * scale[1]])
    t = rng.uniform(0, 1, size=n)
    np.testing.assert_array_equal(
        paint(coords, step, t, shape, scale), reference_paint(coords, step, t, shape, scale)
    )


def test_blend_leaves_uncovered_pixels_alone():
    pixels = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10
    canvas = np.array([[-1, 0.0, 1.0], [-1, -1, 0.5]], dtype=np.float32)
    lut = np.array([[0, 0, 0], [100, 100, 100], [200, 200, 200]], dtype=np.uint8)
    out = blend(pixels, canvas, lut, 0.5)
    assert (out[canvas < 0] == pixels[canvas < 0]).all()
    np.testing.assert_array_equal(out[0, 2], np.rint(0.5 * pixels[0, 2] + 100))
    np.testing.assert_array_equal(out[1, 2], np.rint(0.5 * pixels[1, 2] + 50))


def test_drawing_from_a_table_imports_neither_torch_nor_the_scorer(tmp_path, slide):
    """heatmap (slide, top patches) and geojson from tables stay torch- and model-free (fresh interpreter)."""
    import subprocess

    slide_path, _ = slide
    patch_table(tmp_path / "a.csv")
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from smcli.heatmap import HeatmapRequest, run_heatmap\n"
        "from smcli.geojson import GeoJsonRequest, run_geojson\n"
        f"out, slide = Path({str(tmp_path)!r}), Path({str(slide_path)!r})\n"
        "table = out / 'a.csv'\n"
        "request = HeatmapRequest([table], out / 'm.png', slide=slide, max_side=300, top_patches=2)\n"
        "assert all(not r.error for r in run_heatmap(request))\n"
        "assert all(not r.error for r in run_geojson(GeoJsonRequest([table], out / 'a.geojson')))\n"
        "loaded = [m for m in sys.modules if m.split('.')[0] in ('torch', 'torchmil')]\n"
        "print(sorted(loaded + [m for m in ('smcli.model', 'smcli.scoring') if m in sys.modules]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    assert (tmp_path / "m.png").exists() and (tmp_path / "a.geojson").exists()


def test_default_overlay_is_cropped_to_the_patches_and_opacity_rises_with_the_value(tmp_path, slide):
    from smcli.heatmap import OPACITY_HIGH, OPACITY_LOW
    from smcli.slide import crop_box

    slide_path, _ = slide
    frame = patch_table(tmp_path / "a.csv")
    out = tmp_path / "a.png"
    result = invoke("heatmap", tmp_path / "a.csv", "-o", out, "--slide", slide_path, "--max-side", 800)
    assert result.exit_code == 0, result.stderr
    # patches span x 256..1024, y 128..640; the margin is one step + 5 % of 768 px on each side
    box = crop_box(frame[["x", "y"]].to_numpy(np.float64), (STEP, STEP), (WIDTH, HEIGHT))
    assert box == (153, 25, 1127, 743)
    thumb = read_thumbnail(slide_path, 800, box)
    assert thumb.pixels.shape == (590, 800, 3)  # the box, longer side 800 (the whole slide: 800 x 600)
    drawn = map_of(out, thumb.pixels.shape).astype(np.float64)
    sx, sy = thumb.scale
    t = normalize(frame["attention_logit"].to_numpy(), "rank").t
    for index, opacity in ((int(np.argmax(t)), OPACITY_HIGH), (int(np.argmin(t)), OPACITY_LOW)):
        row = frame.iloc[index]
        # the middle of the patch's footprint, away from rounded edges
        x, y = round((row.x - box[0] + STEP / 2) / sx), round((row.y - box[1] + STEP / 2) / sy)
        colour = LUT[round(t[index] * 255)]
        expected = np.rint((1 - opacity) * thumb.pixels[y, x].astype(np.float64) + opacity * colour)
        np.testing.assert_array_equal(drawn[y, x], expected)
    # outside the patches (the margin) the slide shows untouched
    np.testing.assert_array_equal(drawn[:20, :], thumb.pixels[:20, :])
    assert "x 153-1127, y 25-743" not in result.stderr  # the crop is in the picture's subtitle, not on stderr


def test_labels_and_top_outline_on_the_slide(tmp_path, slide):
    from smcli.heatmap import OUTLINE, TOP_HALO, TOP_OUTLINE

    slide_path, _ = slide
    frame = patch_table(tmp_path / "a.csv")
    frame["label"] = ((frame["x"] >= 640) & (frame["y"] >= 384)).astype(int)  # a 6 x 4 block
    frame.to_csv(tmp_path / "a.csv", index=False)
    plain, marked = tmp_path / "plain.png", tmp_path / "marked.png"
    args = ("--slide", slide_path, "--max-side", 800, "--no-crop")
    assert invoke("heatmap", tmp_path / "a.csv", "-o", plain, *args).exit_code == 0
    result = invoke("heatmap", tmp_path / "a.csv", "-o", marked, *args, "--labels", "--top-outline")
    assert result.exit_code == 0 and "warning" not in result.stderr
    before, after = map_of(plain, (600, 800, 3)), map_of(marked, (600, 800, 3))
    changed = np.any(before != after, axis=2)
    cyan = np.all(after == OUTLINE, axis=2)
    # the label block covers thumbnail x 320..512, y 192..320: its border, 2 px wide, is cyan
    assert cyan[192:320, 320].all() and cyan[192:320, 511].all() and cyan[192, 320:512].all()
    assert not cyan[200:312, 330:500].any() and not cyan[:, :318].any()
    # the top tenth of the ranks (10 of 96 patches) gets a white line inside a black ring
    top = np.all(after == TOP_OUTLINE, axis=2)
    halo = np.all(after == TOP_HALO, axis=2)
    assert top.sum() > 10 * 4 * 2 and halo.sum() > top.sum() / 3  # a 2 px line, a 1 px ring
    t = normalize(frame["attention_logit"].to_numpy(), "rank").t
    hottest = frame.iloc[int(np.argmax(t))]
    x0, y0 = hottest.x // 2, hottest.y // 2  # its 32 px footprint on the thumbnail
    assert (top[y0 : y0 + 32, x0 : x0 + 32] | cyan[y0 : y0 + 32, x0 : x0 + 32]).any()
    assert changed.sum() == (cyan | top | halo).sum()  # nothing else moved


def test_fixed_raw_scale_gives_one_value_one_colour_in_every_bag(tmp_path, slide):
    slide_path, _ = slide
    frames = [patch_table(tmp_path / "a.csv", "a", seed=1), patch_table(tmp_path / "b.csv", "b", seed=2)]
    frames[1]["attention_logit"] = frames[1]["attention_logit"] * 0.2 - 1  # a quieter, cooler bag
    frames[1].to_csv(tmp_path / "b.csv", index=False)
    slides = tmp_path / "slides"
    slides.mkdir()
    for name in ("a", "b"):
        (slides / f"{name}.tif").symlink_to(slide_path)
    out = tmp_path / "maps"
    args = ("--slide", slides, "--max-side", 800, "--no-crop", "--alpha", 1, "--norm", "raw")
    result = invoke(
        "heatmap", tmp_path / "a.csv", tmp_path / "b.csv", "-o", out, *args, "--vmin", -2, "--vmax", 2
    )
    assert result.exit_code == 0, result.stderr
    for name, frame in zip(("a", "b"), frames, strict=True):
        drawn = map_of(out / f"{name}.png", (600, 800, 3))
        for row in frame.itertuples():
            expected = LUT[round(float(np.clip((row.attention_logit + 2) / 4, 0, 1)) * 255)]
            assert (drawn[row.y // 2 + 16, row.x // 2 + 16] == expected).all()


@pytest.mark.parametrize(
    "args, message",
    [
        (("--vmin", 0), "error: --vmin and --vmax go together: one fixed scale needs both ends"),
        (("--vmin", 0, "--vmax", 1), "error: --vmin/--vmax fix a raw scale: add --norm raw (not rank)"),
        (
            ("--norm", "raw", "--vmin", 1, "--vmax", 1),
            "error: --vmin must be below --vmax (both finite), got 1 and 1",
        ),
        (("--norm", "raw", "--vmin", "nan", "--vmax", 1), "error: --vmin must be below --vmax (both finite)"),
    ],
)
def test_bad_fixed_scales_are_one_line_usage_errors(tmp_path, args, message):
    patch_table(tmp_path / "a.csv")
    result = invoke("heatmap", tmp_path / "a.csv", "-o", tmp_path / "a.png", *args)
    assert result.exit_code == 2 and result.stderr.startswith(message) and result.stderr.count("\n") == 1
    assert not (tmp_path / "a.png").exists()


def test_the_colour_bar_says_whose_scale_it_is():
    values = np.array([0.5, 1.0, 3.0])
    assert "within this bag" in normalize(values, "rank").bar_label
    assert "not comparable across bags" in normalize(values, "rank").bar_label
    fixed = normalize(values, "raw", vmin=0, vmax=4)
    assert fixed.bar_label == "raw value, fixed scale (same in every bag)"
    assert [label for _, label in fixed.ticks] == ["0", "1", "2", "3", "4"]
    np.testing.assert_allclose(fixed.t, values / 4)
    assert normalize(np.array([-9.0, 9.0]), "raw", vmin=0, vmax=4).t.tolist() == [0.0, 1.0]  # clipped
    assert "this bag's" in normalize(values, "raw").bar_label


def test_the_label_legend_says_when_there_is_nothing_to_outline():
    from smcli.heatmap import label_legend

    assert label_legend(np.array([0, 1, 0])) == "label 1"
    assert label_legend(np.zeros(3, dtype=np.int8)) == "label 1 (none in this bag)"
