"""`smcli heatmap` without a slide: one PNG per bag, patches on their grid cells, hot = top of the map."""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from safetensors.numpy import save_file
from typer.testing import CliRunner

from smcli.checkpoint import ModelConfig, PoolConfig, build_module, save_checkpoint
from smcli.cli import app
from smcli.heatmap import CHECKER, OUTLINE, PAD, TITLE_H, colour_map, colours, lookup_table, normalize
from smcli.scored import read_table

IN_DIM = 8
STEP = 256
NX, NY = 10, 6  # grid of the test bag: 800 // 10 = 80 pixels per cell
CELL = 80
LUT = lookup_table(colour_map("inferno"))

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def grid_bag(seed: int = 0):
    """Cells (x, y) on a 10 x 6 grid minus two holes; coords = cells * STEP + offset; labels."""
    cells = np.array([(x, y) for x in range(NX) for y in range(NY) if (x, y) not in ((4, 2), (7, 5))])
    coords = cells * STEP + np.array([STEP * 40, STEP * 12])
    features = np.random.default_rng(seed).standard_normal((len(cells), IN_DIM), dtype=np.float32)
    labels = ((cells[:, 0] >= 6) & (cells[:, 1] <= 2)).astype(np.uint8)
    return cells, np.ascontiguousarray(coords), features, labels


def write_bag(path, coords, features, labels=None):
    tensors = {"features": features, "coords": coords}
    if labels is not None:
        tensors["labels"] = labels
    save_file(tensors, str(path), metadata={"patch_size": str(STEP)})
    return path


@pytest.fixture
def model_file(tmp_path):
    config = ModelConfig(PoolConfig(IN_DIM, 4), head=True)
    path = tmp_path / "model.safetensors"
    save_checkpoint(build_module(config).state_dict(), config, path)
    return path


@pytest.fixture
def scored(tmp_path, model_file):
    """Two bags scored into a directory (per-bag CSVs + _bags.csv) and into one table."""
    bags = tmp_path / "bags"
    bags.mkdir()
    cells, coords, features, labels = grid_bag(0)
    write_bag(bags / "slide_a.safetensors", coords, features, labels)
    # labels on both: smcli score cannot yet put labelled and unlabelled bags in one table
    write_bag(bags / "slide_b.safetensors", coords[:30], features[:30] * 2, labels[:30] * 0)
    out = tmp_path / "scores"
    assert invoke("score", bags, "-m", model_file, "-o", out).exit_code == 0
    table = tmp_path / "all.parquet"
    assert invoke("score", bags, "-m", model_file, "-o", table).exit_code == 0
    return {"dir": out, "table": table, "cells": cells, "bags": bags}


def map_of(path) -> np.ndarray:
    """The map region (NY*CELL, NX*CELL, 3) of a written grid heatmap PNG."""
    image = np.asarray(Image.open(path).convert("RGB"))
    return image[TITLE_H : TITLE_H + NY * CELL, PAD : PAD + NX * CELL]


def cell_pixels(pixels: np.ndarray, cell) -> np.ndarray:
    """All pixels (CELL*CELL, 3) of grid cell (x, y)."""
    box = pixels[cell[1] * CELL : (cell[1] + 1) * CELL, cell[0] * CELL : (cell[0] + 1) * CELL]
    return box.reshape(-1, 3)


def is_checker(pixels: np.ndarray) -> bool:
    greys = {tuple(int(v) for v in c) for c in np.unique(pixels.reshape(-1, 3), axis=0)}
    return greys == set(CHECKER)


def test_colour_map_is_matplotlibs_and_unknown_names_are_usage_errors(tmp_path):
    import matplotlib

    expected = np.rint(matplotlib.colormaps["viridis"](np.linspace(0, 1, 256))[:, :3] * 255)
    np.testing.assert_array_equal(lookup_table(colour_map("viridis")), expected.astype(np.uint8))
    # no colour of the default map is a checker grey: "no patch" never reads as low attention
    assert not {tuple(int(v) for v in c) for c in LUT} & set(CHECKER)
    result = invoke("heatmap", tmp_path / "x.csv", "-o", tmp_path / "m", "--cmap", "nope")
    assert result.exit_code == 2
    assert result.stderr.startswith("error: unknown --cmap 'nope': use a matplotlib colour map")
    assert len(result.stderr.strip().splitlines()) == 1


def test_one_bag_image_size_hot_patch_and_background(tmp_path, scored):
    table = scored["dir"] / "slide_a.csv"
    out = tmp_path / "a.png"
    result = invoke("heatmap", table, "-o", out)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "" and f"wrote {out}" in result.stderr
    width, height = Image.open(out).size
    assert width > PAD + NX * CELL + 100 and height > TITLE_H + NY * CELL  # map, colour bar, legend
    pixels = map_of(out)

    frame = pd.read_csv(table)
    origin = frame[["x", "y"]].min().to_numpy()
    hottest = frame.loc[frame["attention_logit"].idxmax()]
    coldest = frame.loc[frame["attention_logit"].idxmin()]
    hot_cell = (np.array([hottest.x, hottest.y]) - origin) // STEP
    cold_cell = (np.array([coldest.x, coldest.y]) - origin) // STEP
    # every pixel of the hottest cell is the top of the map, of the coldest the bottom
    assert (cell_pixels(pixels, hot_cell) == colours(1.0, LUT)).all()
    assert (cell_pixels(pixels, cold_cell) == colours(0.0, LUT)).all()
    assert is_checker(cell_pixels(pixels, (4, 2))) and is_checker(cell_pixels(pixels, (7, 5)))
    # the rank of each patch decides its colour
    t = normalize(frame["attention_logit"].to_numpy(), "rank").t
    for row, value in zip(frame.itertuples(), t, strict=True):
        cell = (np.array([row.x, row.y]) - origin) // STEP
        assert tuple(cell_pixels(pixels, cell)[0]) == tuple(colours(value, LUT))


def test_multi_bag_table_gives_one_png_per_bag(tmp_path, scored):
    out = tmp_path / "maps"
    result = invoke("heatmap", scored["table"], "-o", out, "--norm", "minmax")
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["slide_a.png", "slide_b.png"]
    # the probability comes from the bags file beside the table
    found = {bag.bag_id: bag for bag in read_table(scored["table"], "attention_logit", None)}
    summary = pd.read_csv(tmp_path / "all_bags.csv").set_index("bag_id")
    assert found["slide_a"].probability == pytest.approx(summary.loc["slide_a", "probability"])
    assert found["slide_a"].patch_step == STEP

    one = invoke("heatmap", scored["table"], "-o", tmp_path / "x.png")
    assert one.exit_code == 2 and "holds 2 bags" in one.stderr


def test_labels_draw_outline_pixels(tmp_path, scored):
    table = scored["dir"] / "slide_a.csv"
    plain = map_of(_draw(tmp_path / "plain.png", table))
    mask = (map_of(_draw(tmp_path / "lab.png", table, "--labels")) == OUTLINE).all(axis=2)
    assert not (plain == OUTLINE).all(axis=2).any()
    assert mask.sum() > 0
    # the outline stays inside the labelled block (x >= 6, y <= 2) and runs along its border
    ys, xs = np.nonzero(mask)
    assert xs.min() >= 6 * CELL and ys.max() < 3 * CELL
    assert mask[0:10, 6 * CELL : 10 * CELL].all() and not mask[120, 8 * CELL + 40]

    unlabelled = pd.read_csv(table).drop(columns="label")
    unlabelled.to_csv(tmp_path / "unlabelled.csv", index=False)
    no_labels = invoke("heatmap", tmp_path / "unlabelled.csv", "-o", tmp_path / "u.png", "--labels")
    assert no_labels.exit_code == 0, no_labels.stderr
    assert "warning:" in no_labels.stderr and "no labels to outline" in no_labels.stderr
    assert not (map_of(tmp_path / "u.png") == OUTLINE).all(axis=2).any()


def _draw(out, table, *extra):
    result = invoke("heatmap", table, "-o", out, *extra)
    assert result.exit_code == 0, result.stderr
    return out


def test_bad_column_is_one_line_exit_2(tmp_path, scored):
    table = scored["dir"] / "slide_a.csv"
    result = invoke("heatmap", table, "-o", tmp_path / "m", "--column", "attention")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {table}: no column 'attention' (columns: bag_id")
    assert not (tmp_path / "m").exists() or not list((tmp_path / "m").iterdir())


def test_bag_and_model_in_one_go(tmp_path, scored, model_file):
    bag = scored["bags"] / "slide_a.safetensors"
    out = tmp_path / "from_bag"
    result = invoke("heatmap", bag, "-m", model_file, "-o", out, "--labels")
    assert result.exit_code == 0, result.stderr
    direct = map_of(out / "slide_a.png")
    via_table = map_of(_draw(tmp_path / "t.png", scored["dir"] / "slide_a.csv", "--labels"))
    np.testing.assert_array_equal(direct, via_table)

    no_model = invoke("heatmap", bag, "-o", out)
    assert no_model.exit_code == 2 and "-m MODEL" in no_model.stderr


def test_directory_of_scores_skips_bags_files(tmp_path, scored):
    out = tmp_path / "maps"
    result = invoke("heatmap", scored["dir"], "-o", out, "--norm", "log", "--column", "attention_weight")
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["slide_a.png", "slide_b.png"]

    logit = invoke("heatmap", scored["dir"] / "slide_a.csv", "-o", out, "--norm", "log")
    assert logit.exit_code == 2 and "--norm log needs positive values" in logit.stderr


def test_normalizations():
    values = np.array([3.0, -1.0, 2.0, 2.0, 10.0])
    rank = normalize(values, "rank")
    assert rank.t.tolist() == [0.75, 0.0, 0.375, 0.375, 1.0]
    assert rank.ticks[-1] == (1.0, "100%")
    raw = normalize(values, "raw")
    assert raw.t.min() == 0 and raw.t.max() == 1 and raw.ticks[0][1] == "-1" and raw.ticks[-1][1] == "10"
    assert normalize(values, "minmax").ticks[2] == (0.5, "0.5")
    log = normalize(np.array([1e-4, 1e-2, 1.0]), "log")
    assert log.t.tolist() == [0.0, 0.5, 1.0] and log.ticks[2][1] == "0.01"
    assert normalize(np.array([5.0, 5.0]), "minmax").t.tolist() == [0.5, 0.5]


def test_without_matplotlib_the_error_names_the_extra(tmp_path, scored, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    result = invoke("heatmap", scored["dir"] / "slide_a.csv", "-o", tmp_path / "m")
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: drawing heatmaps needs matplotlib: pip install 'smcli[plot]'"


def test_a_two_row_table_spanning_4e9_pixels_is_refused_without_allocating(tmp_path):
    """Issue 9 §4: the grid is sized from the input; a huge empty span is an error, not 6.5 GB."""
    import tracemalloc

    table = tmp_path / "far.csv"
    frame = pd.DataFrame({"x": [0, 1], "y": [0, 4_000_000_000], "attention_logit": [0.1, 0.2]})
    frame.to_csv(table, index=False)
    tracemalloc.start()
    result = invoke("heatmap", table, "-o", tmp_path / "far.png")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {table}: far: a grid of 2 x ")
    assert "too large to draw (at most 16000 cells a side" in lines[0]
    assert lines[0].endswith("check --patch-size")
    assert peak < 50e6


def test_a_thin_strip_of_cells_is_one_line_with_the_size_and_limit(tmp_path):
    table = tmp_path / "strip.csv"  # 2 rows spanning 16M x 1 cells: within the area bound, not a side
    table.write_text("bag_id,instance,x,y,attention_logit\na,0,0,0,1.0\na,1,4096000000,0,2.0\n")
    result = invoke("heatmap", table, "-o", tmp_path / "maps", "--patch-size", "256")
    assert result.exit_code == 1
    assert result.stderr == (
        f"error: {table}: a: a grid of 16000001 x 1 cells at patch step 256 is too large to draw "
        "(at most 16000 cells a side, 16000000 in all); check --patch-size\n"
    )


def test_a_table_with_an_empty_bag_id_is_an_error_not_a_silent_exit_0(tmp_path):
    table = tmp_path / "unnamed.csv"
    table.write_text("bag_id,instance,x,y,attention_logit\n,0,0,0,1.0\nb,1,256,0,2.0\n")
    result = invoke("heatmap", table, "-o", tmp_path / "maps")
    assert (result.exit_code, result.stderr) == (1, f"error: {table}: 1 of 2 rows have an empty bag_id\n")
