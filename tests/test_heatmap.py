"""`smcli heatmap`: one PNG per bag, patches on their grid cells, hot = top of the colour map."""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from smcli.checkpoint import ModelConfig, PoolConfig, build_module, save_checkpoint
from smcli.cli import app
from smcli.heatmap import BACKGROUND, OUTLINE, Layout, colormap, normalize, read_table

IN_DIM = 8
STEP = 256
NX, NY = 10, 6  # grid of the test bag: 800 // 10 = 80 pixels per cell

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def grid_bag(seed: int = 0):
    """Cells (x, y) on a 10 x 6 grid minus two holes; coords = cells * STEP + offset; labels."""
    cells = np.array([(x, y) for x in range(NX) for y in range(NY) if (x, y) not in ((4, 2), (7, 5))])
    coords = cells * STEP + np.array([STEP * 40, STEP * 12])
    features = torch.randn(len(cells), IN_DIM, generator=torch.Generator().manual_seed(seed))
    labels = ((cells[:, 0] >= 6) & (cells[:, 1] <= 2)).astype(np.uint8)
    return cells, np.ascontiguousarray(coords), features, labels


def write_bag(path, coords, features, labels=None):
    tensors = {"features": features, "coords": torch.from_numpy(coords)}
    if labels is not None:
        tensors["labels"] = torch.from_numpy(labels)
    save_file(tensors, str(path), metadata={"patch_size": str(STEP)})
    return path


@pytest.fixture
def model_file(tmp_path):
    torch.manual_seed(3)
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


def pixel(image, layout: Layout, cell) -> tuple[int, int, int]:
    """Colour at the centre of grid cell (x, y)."""
    x0, y0 = layout.map_origin
    return image.getpixel(
        (x0 + cell[0] * layout.cell + layout.cell // 2, y0 + cell[1] * layout.cell + layout.cell // 2)
    )


def test_colormap_runs_dark_to_light():
    ends = colormap(np.array([0.0, 1.0]))
    assert ends[0].sum() < 150 and ends[1].sum() > 550
    lightness = colormap(np.linspace(0, 1, 50)).astype(int) @ np.array([299, 587, 114])
    assert (np.diff(lightness) > 0).all()
    assert tuple(ends[0]) != BACKGROUND and tuple(ends[1]) != BACKGROUND


def test_one_bag_image_size_hot_patch_and_background(tmp_path, scored):
    table = scored["dir"] / "slide_a.csv"
    out = tmp_path / "a.png"
    result = invoke("heatmap", table, "-o", out)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "" and f"wrote {out}" in result.stderr
    image = Image.open(out).convert("RGB")
    layout = Layout.for_grid(NX, NY)
    assert layout.cell == 80 and layout.map_size == (800, 480)
    assert image.size == layout.size

    frame = pd.read_csv(table)
    hottest = frame.loc[frame["attention_logit"].idxmax()]
    coldest = frame.loc[frame["attention_logit"].idxmin()]
    to_cell = (np.array([hottest.x, hottest.y]) - frame[["x", "y"]].min().to_numpy()) // STEP
    cold_cell = (np.array([coldest.x, coldest.y]) - frame[["x", "y"]].min().to_numpy()) // STEP
    assert pixel(image, layout, to_cell) == tuple(colormap(1.0))
    assert pixel(image, layout, cold_cell) == tuple(colormap(0.0))
    hole = pixel(image, layout, (4, 2))
    assert hole == BACKGROUND and hole != tuple(colormap(0.0))
    # every pixel of the hottest cell, not just its centre
    x0, y0 = layout.map_origin
    box = np.asarray(image)[
        y0 + to_cell[1] * 80 : y0 + (to_cell[1] + 1) * 80, x0 + to_cell[0] * 80 : x0 + (to_cell[0] + 1) * 80
    ]
    assert (box == colormap(1.0)).all()


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
    plain = np.asarray(Image.open(_draw(tmp_path / "plain.png", table)).convert("RGB"))
    outlined = np.asarray(Image.open(_draw(tmp_path / "lab.png", table, "--labels")).convert("RGB"))
    assert not (plain == OUTLINE).all(axis=2).any()
    layout = Layout.for_grid(NX, NY)
    x0, y0 = layout.map_origin
    mask = (outlined == OUTLINE).all(axis=2)[y0 : y0 + 480, x0 : x0 + 800]
    assert mask.sum() > 0
    # the outline stays inside the labelled block (x >= 6, y <= 2) and runs along its border
    ys, xs = np.nonzero(mask)
    assert xs.min() >= 6 * 80 and ys.max() < 3 * 80
    assert mask[0:10, 6 * 80 : 10 * 80].all() and not mask[120, 8 * 80 + 40]

    unlabelled = pd.read_csv(table).drop(columns="label")
    unlabelled.to_csv(tmp_path / "unlabelled.csv", index=False)
    no_labels = invoke("heatmap", tmp_path / "unlabelled.csv", "-o", tmp_path / "u.png", "--labels")
    assert no_labels.exit_code == 0, no_labels.stderr
    assert "warning:" in no_labels.stderr and "no labels to outline" in no_labels.stderr
    assert not (np.asarray(Image.open(tmp_path / "u.png").convert("RGB")) == OUTLINE).all(axis=2).any()


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
    direct = np.asarray(Image.open(out / "slide_a.png").convert("RGB"))
    via_table = np.asarray(
        Image.open(_draw(tmp_path / "t.png", scored["dir"] / "slide_a.csv", "--labels")).convert("RGB")
    )
    layout = Layout.for_grid(NX, NY)
    x0, y0 = layout.map_origin
    region = (slice(y0, y0 + 480), slice(x0, x0 + 800))
    np.testing.assert_array_equal(direct[region], via_table[region])

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


def test_without_pillow_the_error_names_the_extra(tmp_path, scored, monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)
    result = invoke("heatmap", scored["dir"] / "slide_a.csv", "-o", tmp_path / "m")
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: drawing heatmaps needs Pillow: pip install 'smcli[plot]'"
