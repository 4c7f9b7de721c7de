"""Units: micrometre coords (STAMP) placed on the slide with its microns per pixel, or --mpp.

A STAMP-style h5 bag (coords and tile_size_um in micrometres) and a tiled pyramidal TIFF with a
known MPP (tifffile: resolution in pixels per centimetre, each level its own tiled page, reduced
levels subfiletype 1) that OpenSlide reads as openslide.mpp-x/y. Tissue is painted on the slide
exactly where the patches are in micrometres, so the overlay, the GeoJSON and the errors can be
checked against pixels.
"""

from __future__ import annotations

import json
import math

import h5py
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import tifffile
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from smcli.checkpoint import ModelConfig, PoolConfig, build_module, save_checkpoint
from smcli.cli import app
from smcli.errors import BagError, UsageError
from smcli.heatmap import PAD, TITLE_H
from smcli.scored import read_table
from smcli.units import (
    MICROMETRES,
    PIXELS,
    Mpp,
    mpp_from_properties,
    parse_units,
    resolve_mpp,
    to_level0,
)

runner = CliRunner()
IN_DIM = 8
MPP = 0.5  # µm per level-0 pixel of the test slide
TILE_UM = 128.0  # patch side in µm: 256 level-0 px
WIDTH, HEIGHT = 2048, 1536  # level 0, px
GRID = (4, 3)  # patches along x, y
ORIGIN_UM = (256.0, 192.0)  # the first patch's corner in µm: (512, 384) px
GLASS = (250, 250, 250)
TISSUE = (200, 120, 170)


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def coords_um() -> np.ndarray:
    cells = np.array([(x, y) for y in range(GRID[1]) for x in range(GRID[0])], dtype=np.float64)
    return cells * TILE_UM + np.array(ORIGIN_UM)


def tissue_box_px() -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) level-0 px of the patches: where the slide has tissue."""
    x0, y0 = int(ORIGIN_UM[0] / MPP), int(ORIGIN_UM[1] / MPP)
    side = int(TILE_UM / MPP)
    return x0, y0, x0 + GRID[0] * side, y0 + GRID[1] * side


def write_slide(path, mpp: float | None = MPP):
    """Glass with one block of tissue at tissue_box_px; levels at downsample 1, 2, 4."""
    level = np.empty((HEIGHT, WIDTH, 3), dtype=np.uint8)
    level[:] = GLASS
    x0, y0, x1, y1 = tissue_box_px()
    level[y0:y1, x0:x1] = TISSUE
    with tifffile.TiffWriter(path) as tif:
        for index, factor in enumerate((1, 2, 4)):
            extra = {}
            if mpp is not None:
                extra = {"resolution": (1e4 / (mpp * factor),) * 2, "resolutionunit": "CENTIMETER"}
            tif.write(
                level[::factor, ::factor],
                tile=(256, 256),
                compression="zlib",
                photometric="rgb",
                subfiletype=1 if index else 0,
                metadata=None,
                **extra,
            )
    return path


def write_stamp(path, features, coords):
    """STAMP <extractor>/<slide>.h5: float16 feats, micrometre coords, tile_size_um on the file."""
    with h5py.File(path, "w") as handle:
        handle["coords"] = coords.astype(np.float32)
        handle["feats"] = features.astype(np.float16)
        handle.attrs["unit"] = "um"
        handle.attrs["tile_size_um"] = TILE_UM
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A model, the STAMP bag `slide_s`, its slide (with and without an MPP), and its scores."""
    folder = tmp_path_factory.mktemp("units")
    config = ModelConfig(PoolConfig(IN_DIM, 4), head=True)
    model = folder / "model.safetensors"
    save_checkpoint(build_module(config).state_dict(), config, model)
    bags = folder / "bags"
    bags.mkdir()
    features = np.random.default_rng(0).standard_normal((GRID[0] * GRID[1], IN_DIM))
    write_stamp(bags / "slide_s.h5", features, coords_um())
    slides = folder / "slides"
    slides.mkdir()
    write_slide(slides / "slide_s.tiff")
    bare = folder / "bare"
    bare.mkdir()
    write_slide(bare / "slide_s.tiff", mpp=None)
    scores = folder / "scores"
    assert invoke("score", bags, "-m", model, "-o", scores).exit_code == 0
    table = folder / "all.parquet"
    assert invoke("score", bags, "-m", model, "-o", table).exit_code == 0
    per_bag_parquet = folder / "pq"
    assert invoke("score", bags, "-m", model, "-o", per_bag_parquet, "--format", "parquet").exit_code == 0
    return {
        "model": model,
        "bag": bags / "slide_s.h5",
        "slide": slides / "slide_s.tiff",
        "slides": slides,
        "bare": bare / "slide_s.tiff",
        "csv": scores / "slide_s.csv",
        "parquet": table,
        "per_bag_parquet": per_bag_parquet / "slide_s.parquet",
    }


# --- the pure functions -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, unit",
    [
        (None, PIXELS),
        ("", PIXELS),
        (float("nan"), PIXELS),
        ("level-0 pixels", PIXELS),
        ("px", PIXELS),
        ("micrometres", MICROMETRES),
        (" Micrometers ", MICROMETRES),
        ("um", MICROMETRES),
        ("µm", MICROMETRES),
    ],
)
def test_stored_unit_names_are_read(text, unit):
    assert parse_units(text) == unit


def test_an_unknown_unit_is_a_bag_error_naming_it():
    with pytest.raises(BagError, match=r"^x.h5: coords_units 'mm' is not a unit smcli knows"):
        parse_units("mm", "x.h5")


def test_slide_properties_give_the_mpp_and_the_flag_overrides_them():
    assert mpp_from_properties({"openslide.mpp-x": "0.25", "openslide.mpp-y": "0.26"}) == (0.25, 0.26)
    assert mpp_from_properties({"openslide.mpp-x": "0.25"}) == (0.25, 0.25)
    for bad in ({}, {"openslide.mpp-x": "0"}, {"openslide.mpp-x": "nan"}, {"openslide.mpp-x": "n/a"}):
        assert mpp_from_properties(bad) is None
    assert resolve_mpp(None, (0.25, 0.25), "a.svs") == Mpp(0.25, 0.25, "a.svs openslide.mpp-x/y")
    assert resolve_mpp(0.5, (0.25, 0.25), "a.svs") == Mpp(0.5, 0.5, "--mpp")
    assert resolve_mpp(None, None) is None
    with pytest.raises(UsageError, match="--mpp must be a positive number"):
        resolve_mpp(-1.0, None)


@given(
    st.lists(st.tuples(st.floats(0, 1e5), st.floats(0, 1e5)), min_size=1, max_size=20),
    st.floats(1, 1000),
    st.floats(0.05, 4),
    st.floats(0.05, 4),
)
def test_micrometres_divide_by_the_mpp_per_axis(points, step, mpp_x, mpp_y):
    coords = np.array(points)
    placed = to_level0(coords, step, MICROMETRES, Mpp(mpp_x, mpp_y, "--mpp"), "w")
    assert np.allclose(placed.coords[:, 0] * mpp_x, coords[:, 0], rtol=1e-12, atol=1e-9)
    assert np.allclose(placed.coords[:, 1] * mpp_y, coords[:, 1], rtol=1e-12, atol=1e-9)
    assert placed.patch_side == pytest.approx((step / mpp_x, step / mpp_y))
    assert "µm/px (--mpp)" in placed.note
    same = to_level0(coords, step, PIXELS, Mpp(mpp_x, mpp_y, "--mpp"), "w")  # pixels stay pixels
    assert np.array_equal(same.coords, coords) and same.patch_side == (step, step) and same.note == ""


def test_micrometres_without_an_mpp_fail_naming_the_flag():
    with pytest.raises(BagError, match=r"^t.csv: b: coords are in micrometres and no --slide .*: pass --mpp"):
        to_level0(np.zeros((1, 2)), 1.0, MICROMETRES, None, "t.csv: b", "no --slide gives the scale")


# --- the unit travels with the scores -----------------------------------------------------------


def test_every_kind_of_score_table_carries_the_unit(world):
    bags_row = pd.read_csv(world["csv"].parent / "_bags.csv").iloc[0]
    assert bags_row["coords_units"] == MICROMETRES
    assert pd.read_csv(world["parquet"].with_name("all_bags.csv")).iloc[0]["coords_units"] == MICROMETRES
    for table in (world["parquet"], world["per_bag_parquet"]):
        assert pq.read_metadata(table).metadata[b"smcli.coords_units"] == MICROMETRES.encode()
    for table in (world["csv"], world["parquet"], world["per_bag_parquet"]):
        (bag,) = read_table(table, "attention_logit", None)
        assert bag.coords_units == MICROMETRES and bag.patch_step == TILE_UM


def test_a_safetensors_bag_converted_from_stamp_keeps_micrometres(world, tmp_path):
    converted = tmp_path / "slide_s.safetensors"
    assert invoke("convert-bag", world["bag"], "-o", converted).exit_code == 0
    out = tmp_path / "scores"
    assert invoke("score", converted, "-m", world["model"], "-o", out).exit_code == 0
    (bag,) = read_table(out / "slide_s.csv", "attention_logit", None)
    assert bag.coords_units == MICROMETRES


def test_a_pixel_bag_is_recorded_in_pixels(world, tmp_path):
    bag = tmp_path / "p.safetensors"
    features = np.random.default_rng(0).standard_normal((6, IN_DIM), dtype=np.float32)
    coords = np.array([[x * 256, y * 256] for x in range(3) for y in range(2)], dtype=np.int64)
    from safetensors.numpy import save_file

    save_file({"features": features, "coords": coords}, str(bag), metadata={"patch_size": "256"})
    out = tmp_path / "scores"
    assert invoke("score", bag, "-m", world["model"], "-o", out).exit_code == 0
    assert pd.read_csv(out / "_bags.csv").iloc[0]["coords_units"] == PIXELS


# --- pictures and GeoJSON in level-0 pixels -------------------------------------------------------


def coloured_box(png, level0_scale: float):
    """The level-0 px box (x0, y0, x1, y1) of the map's pixels that are not the slide's glass or
    tissue, i.e. painted with attention, in a whole-slide picture (--no-crop) drawn at --alpha 1."""
    image = np.asarray(Image.open(png).convert("RGB")).astype(int)
    map_h, map_w = round(HEIGHT / level0_scale), round(WIDTH / level0_scale)
    region = image[TITLE_H : TITLE_H + map_h, PAD : PAD + map_w]
    plain = (np.abs(region - GLASS).sum(axis=2) <= 6) | (np.abs(region - TISSUE).sum(axis=2) <= 6)
    ys, xs = np.nonzero(~plain)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]) * level0_scale


@pytest.mark.parametrize("source", ["csv", "parquet", "bag"])
def test_the_overlay_paints_attention_on_the_tissue(world, tmp_path, source):
    out = tmp_path / "overlay.png"
    extra = ["-m", world["model"]] if source == "bag" else []
    result = invoke(
        "heatmap",
        world[source],
        "-o",
        out,
        "--slide",
        world["slides"],
        "--max-side",
        512,
        "--alpha",
        1,
        "--no-crop",
        *extra,
    )
    assert result.exit_code == 0, result.output
    notes = [line for line in result.output.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "drawn at 0.5 µm/px (slide_s.tiff openslide.mpp-x/y)" in notes[0]
    box = coloured_box(out, WIDTH / 512)
    assert np.allclose(box, tissue_box_px(), atol=4 * 2)  # within a thumbnail pixel or two


def test_mpp_flag_overrides_the_slide(world, tmp_path):
    out = tmp_path / "overlay.png"
    # at 1 µm/px every coordinate and the patch side are half as many pixels as at the slide's 0.5
    result = invoke(
        "heatmap",
        world["csv"],
        "-o",
        out,
        "--slide",
        world["slide"],
        "--max-side",
        512,
        "--alpha",
        1,
        "--no-crop",
        "--mpp",
        1,
    )
    assert result.exit_code == 0, result.output
    assert "note: " in result.output and "drawn at 1 µm/px (--mpp)" in result.output
    expected = np.array(tissue_box_px()) / 2
    assert np.allclose(coloured_box(out, WIDTH / 512), expected, atol=8)


def test_a_slide_without_mpp_fails_the_bag_in_one_line(world, tmp_path):
    out = tmp_path / "overlay.png"
    result = invoke("heatmap", world["csv"], "-o", out, "--slide", world["bare"])
    assert result.exit_code == 1
    assert result.output == (
        f"error: {world['csv']}: slide_s: coords are in micrometres and slide slide_s.tiff records no "
        "microns per pixel (openslide.mpp-x/y): pass --mpp (micrometres per level-0 pixel of the slide)\n"
    )
    assert not out.exists()
    assert invoke("heatmap", world["csv"], "-o", out, "--slide", world["bare"], "--mpp", MPP).exit_code == 0


def test_the_grid_picture_needs_no_mpp(world, tmp_path):
    result = invoke("heatmap", world["csv"], "-o", tmp_path / "grid.png")
    assert result.exit_code == 0 and "note:" not in result.output


def polygons(path) -> np.ndarray:
    """(N, 4) x0, y0, x1, y1 of each feature's ring, in file order."""
    document = json.loads(path.read_text())
    rings = [feature["geometry"]["coordinates"][0] for feature in document["features"]]
    return np.array([[ring[0][0], ring[0][1], ring[2][0], ring[2][1]] for ring in rings], dtype=float)


@pytest.mark.parametrize("how", [("--mpp", MPP), ("--slide", "slide"), ("--slide", "slides")])
def test_geojson_is_in_level0_pixels(world, tmp_path, how):
    flag, value = how
    out = tmp_path / "s.geojson"
    result = invoke("geojson", world["csv"], "-o", out, flag, world.get(value, value))
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0].startswith(
        f"note: {world['csv']}: slide_s: coords in micrometres drawn at 0.5 µm/px"
    )
    expected = np.hstack([coords_um() / MPP, coords_um() / MPP + TILE_UM / MPP])
    assert np.array_equal(polygons(out), expected)
    assert all(float(v).is_integer() for v in expected.ravel())


def test_geojson_of_micrometres_without_slide_or_mpp_is_one_line_exit_1(world, tmp_path):
    out = tmp_path / "s.geojson"
    result = invoke("geojson", world["csv"], "-o", out)
    assert result.exit_code == 1
    assert result.output == (
        f"error: {world['csv']}: slide_s: coords are in micrometres and no --slide gives the scale: "
        "pass --mpp (micrometres per level-0 pixel of the slide)\n"
    )
    assert not out.exists()
    result = invoke("geojson", world["csv"], "-o", out, "--slide", world["bare"])
    assert result.exit_code == 1 and "records no microns per pixel" in result.output and not out.exists()


def test_geojson_with_a_slide_refuses_patches_off_the_slide(world, tmp_path):
    out = tmp_path / "s.geojson"
    result = invoke("geojson", world["csv"], "-o", out, "--slide", world["slide"], "--mpp", 0.05)
    assert result.exit_code == 1 and "lie outside slide" in result.output and not out.exists()


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_a_bad_mpp_is_a_usage_error(world, tmp_path, value):
    for command in ("heatmap", "geojson"):
        result = invoke(command, world["csv"], "-o", tmp_path / "x", "--mpp", value)
        assert result.exit_code == 2, result.output
        assert (
            result.output.startswith("error: --mpp must be a positive number")
            and result.output.count("\n") == 1
        )


def test_mpp_is_noted_unused_for_pixel_coords(world, tmp_path):
    table = tmp_path / "p.csv"
    pd.DataFrame(
        {
            "bag_id": "p",
            "instance": [0, 1],
            "x": [0, 256],
            "y": [0, 0],
            "attention_logit": [0.0, 1.0],
            "attention_weight": [0.27, 0.73],
        }
    ).to_csv(table, index=False)
    result = invoke("geojson", table, "-o", tmp_path / "p.geojson", "--mpp", 0.25)
    assert result.exit_code == 0
    assert f"note: {table}: p: --mpp 0.25 not used: coords are level-0 pixels already" in result.output
    assert polygons(tmp_path / "p.geojson")[1].tolist() == [256, 0, 512, 256]
    assert math.isclose(polygons(tmp_path / "p.geojson")[0][2], 256)


def test_the_default_overlay_is_cropped_around_the_tissue_in_level0_pixels(world, tmp_path):
    from smcli.slide import crop_box, thumbnail_size

    out = tmp_path / "overlay.png"
    result = invoke("heatmap", world["csv"], "-o", out, "--slide", world["slide"], "--max-side", 512)
    assert result.exit_code == 0, result.output
    x0, y0, x1, y1 = tissue_box_px()
    side = TILE_UM / MPP
    box = crop_box(coords_um() / MPP, (side, side), (WIDTH, HEIGHT))
    assert box[0] < x0 and box[1] < y0 and box[2] > x1 and box[3] > y1  # the tissue and a margin
    width, height = thumbnail_size(box[2] - box[0], box[3] - box[1], 512)
    image = np.asarray(Image.open(out).convert("RGB")).astype(int)
    region = image[TITLE_H : TITLE_H + height, PAD : PAD + width]
    plain = (np.abs(region - GLASS).sum(axis=2) <= 6) | (np.abs(region - TISSUE).sum(axis=2) <= 6)
    ys, xs = np.nonzero(~plain)
    scale = (box[2] - box[0]) / width
    found = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]) * scale + np.array(box[:2] * 2)
    assert np.allclose(found, tissue_box_px(), atol=2 * scale)
    assert not (np.abs(region - TISSUE).sum(axis=2) <= 6).any()  # every tissue pixel carries attention


def test_a_multi_bag_table_keeps_each_bags_unit(world, tmp_path):
    """A STAMP bag (micrometres) and a pixel bag in one parquet table and one CSV table."""
    from safetensors.numpy import save_file

    bags = tmp_path / "bags"
    bags.mkdir()
    (bags / "slide_s.h5").symlink_to(world["bag"])
    features = np.random.default_rng(1).standard_normal((6, IN_DIM), dtype=np.float32)
    coords = np.array([[x * 256, y * 256] for x in range(3) for y in range(2)], dtype=np.int64)
    save_file({"features": features, "coords": coords}, str(bags / "p.safetensors"), {"patch_size": "256"})
    for name in ("all.parquet", "all.csv"):
        assert invoke("score", bags, "-m", world["model"], "-o", tmp_path / name).exit_code == 0
        found = {bag.bag_id: bag.coords_units for bag in read_table(tmp_path / name, "attention_logit", None)}
        assert found == {"p": PIXELS, "slide_s": MICROMETRES}
    metadata = pq.read_metadata(tmp_path / "all.parquet").metadata
    assert b"smcli.coords_units" not in metadata  # not shared: each bag's entry of smcli.bags has it
    entries = {e["smcli.bag_id"]: e["smcli.coords_units"] for e in json.loads(metadata[b"smcli.bags"])}
    assert entries == {"p": PIXELS, "slide_s": MICROMETRES}


def test_top_patches_of_a_micrometre_bag_are_cut_at_level0_pixels(world, tmp_path):
    out = tmp_path / "maps"
    result = invoke("heatmap", world["csv"], "-o", out, "--slide", world["slides"], "--top-patches", 3)
    assert result.exit_code == 0, result.output
    side = int(TILE_UM / MPP)
    table = pd.read_csv(world["csv"]).sort_values("attention_logit", ascending=False, kind="stable").head(3)
    names = [
        f"rank_{rank:03d}_instance_{row.instance}_x{round(row.x / MPP)}_y{round(row.y / MPP)}.png"
        for rank, row in enumerate(table.itertuples(), 1)
    ]
    assert sorted(p.name for p in (out / "slide_s_top").iterdir()) == sorted(names)
    for name in names:  # a whole 256 px patch of tissue: the crop sits on the tissue, at full size
        crop = np.asarray(Image.open(out / "slide_s_top" / name))
        assert crop.shape == (side, side, 3) and (crop == TISSUE).all()


def test_micrometre_scores_on_stdout_warn_that_the_unit_is_lost(world, tmp_path):
    result = invoke("score", world["bag"], "-m", world["model"])
    assert result.exit_code == 0
    assert result.stdout.startswith("bag_id,instance,x,y,")
    warnings = [line for line in result.stderr.splitlines() if "cannot record the unit" in line]
    assert warnings == [
        f"warning: {world['bag']}: coords in micrometres, and a CSV on stdout cannot record the unit "
        "(heatmap and geojson would take it as level-0 pixels): write it with -o"
    ]
    kept = invoke("score", world["bag"], "-m", world["model"], "-o", tmp_path / "scores")
    assert kept.exit_code == 0 and "cannot record the unit" not in kept.stderr
