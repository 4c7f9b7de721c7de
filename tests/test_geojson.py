"""`smcli geojson`: QuPath tiles, checked with shapely (valid squares, exact footprints, round trip)
and against the structure QuPath imports."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import shapely
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file
from shapely.geometry import mapping, shape
from typer.testing import CliRunner

from smcli.checkpoint import ModelConfig, PoolConfig, build_module, save_checkpoint
from smcli.cli import app
from smcli.geojson import feature_collection
from smcli.scored import BagValues

runner = CliRunner()
STEP = 256


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def scores_table(path, bag_id="slide_a", n=30, seed=0, step=STEP):
    rng = np.random.default_rng(seed)
    cells = np.array([(x, y) for x in range(6) for y in range(5)])[:n]
    coords = cells * step + np.array([10_240, 4_096])
    logits = rng.standard_normal(n)
    frame = pd.DataFrame(
        {
            "bag_id": bag_id,
            "instance": np.arange(n),
            "x": coords[:, 0],
            "y": coords[:, 1],
            "attention_logit": logits,
            "attention_weight": np.exp(logits) / np.exp(logits).sum(),
        }
    )
    frame.to_csv(path, index=False)
    return frame


def check_structure(document: dict, object_type: str = "tile") -> None:
    """What QuPath's GeoJSON import reads, written out by hand (a schema check)."""
    assert set(document) == {"type", "features"} and document["type"] == "FeatureCollection"
    assert isinstance(document["features"], list)
    for feature in document["features"]:
        assert set(feature) == {"type", "id", "geometry", "properties"} and feature["type"] == "Feature"
        assert isinstance(feature["id"], str)
        geometry = feature["geometry"]
        assert set(geometry) == {"type", "coordinates"} and geometry["type"] == "Polygon"
        ring = geometry["coordinates"][0]
        assert len(geometry["coordinates"]) == 1 and len(ring) == 5 and ring[0] == ring[-1]
        assert all(len(point) == 2 and all(isinstance(v, (int, float)) for v in point) for point in ring)
        properties = feature["properties"]
        assert set(properties) <= {"objectType", "name", "measurements", "classification"}
        assert properties["objectType"] == object_type and isinstance(properties["name"], str)
        measurements = properties["measurements"]
        assert set(measurements) == {"attention_logit", "attention_weight", "attention_percentile"}
        assert all(isinstance(v, float) and np.isfinite(v) for v in measurements.values())
        assert 0.0 <= measurements["attention_percentile"] <= 100.0
        if "classification" in properties:
            classification = properties["classification"]
            assert set(classification) == {"name", "color"} and isinstance(classification["name"], str)
            assert len(classification["color"]) == 3 and all(0 <= c <= 255 for c in classification["color"])


def test_one_bag_tiles_match_coords_times_step_and_round_trip(tmp_path):
    frame = scores_table(tmp_path / "a.csv")
    out = tmp_path / "a.geojson"
    result = invoke("geojson", tmp_path / "a.csv", "-o", out, "--top-k", 3)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "" and result.stderr.strip() == f"smcli: wrote {out} (30 tiles)"
    document = json.loads(out.read_text())
    check_structure(document)
    by_instance = frame.set_index("instance")
    for feature in document["features"]:
        row = by_instance.loc[int(feature["id"])]
        polygon = shape(feature["geometry"])
        assert polygon.is_valid and polygon.area == STEP * STEP
        assert polygon.bounds == (row.x, row.y, row.x + STEP, row.y + STEP)
        assert mapping(polygon)["coordinates"][0] == tuple(map(tuple, feature["geometry"]["coordinates"][0]))
        measurements = feature["properties"]["measurements"]
        assert measurements["attention_logit"] == row.attention_logit
        assert measurements["attention_weight"] == row.attention_weight
    collection = shapely.from_geojson(out.read_text())  # the whole file, through shapely
    assert len(collection.geoms) == 30 and collection.area == 30 * STEP * STEP  # no two tiles overlap
    top = [f for f in document["features"] if "classification" in f["properties"]]
    expected = frame.nlargest(3, "attention_logit")["instance"].tolist()
    assert sorted(int(f["id"]) for f in top) == sorted(expected)
    assert all(f["properties"]["classification"]["name"] == "Top attention" for f in top)
    percentiles = [f["properties"]["measurements"]["attention_percentile"] for f in document["features"]]
    assert min(percentiles) == 0.0 and max(percentiles) == 100.0


def test_min_percentile_detection_and_several_bags(tmp_path):
    both = pd.concat([scores_table(tmp_path / "x.csv", "a"), scores_table(tmp_path / "y.csv", "b", 20, 1)])
    both.to_csv(tmp_path / "both.csv", index=False)
    out = tmp_path / "tiles"
    result = invoke("geojson", tmp_path / "both.csv", "-o", out, "--min-percentile", 50, "--detection")
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["a.geojson", "b.geojson"]
    a = json.loads((out / "a.geojson").read_text())
    check_structure(a, "detection")
    kept = [f["properties"]["measurements"]["attention_percentile"] for f in a["features"]]
    assert len(kept) == 15 and min(kept) >= 50  # 30 distinct logits: ranks 15..29 of 0..29
    single = invoke("geojson", tmp_path / "both.csv", "-o", tmp_path / "one.geojson")
    assert single.exit_code == 2
    assert single.stderr.strip().startswith(f"error: {tmp_path / 'both.csv'}: holds 2 bags")


def test_bag_with_model_gives_the_same_tiles_as_its_table(tmp_path):
    config = ModelConfig(PoolConfig(8, 4), head=True)
    model = tmp_path / "model.safetensors"
    save_checkpoint(build_module(config).state_dict(), config, model)
    coords = np.array([(x, y) for x in range(7) for y in range(4)], dtype=np.int64) * STEP
    bag = tmp_path / "bag_1.safetensors"
    features = np.random.default_rng(0).standard_normal((len(coords), 8), dtype=np.float32)
    save_file({"features": features, "coords": coords}, str(bag), {"patch_size": str(STEP)})
    assert invoke("score", bag, "-m", model, "-o", tmp_path / "scores").exit_code == 0
    direct = invoke("geojson", bag, "-m", model, "-o", tmp_path / "direct.geojson")
    via_table = invoke("geojson", tmp_path / "scores" / "bag_1.csv", "-o", tmp_path / "table.geojson")
    assert direct.exit_code == 0 and via_table.exit_code == 0, direct.stderr + via_table.stderr
    one = json.loads((tmp_path / "direct.geojson").read_text())
    other = json.loads((tmp_path / "table.geojson").read_text())
    assert [f["geometry"] for f in one["features"]] == [f["geometry"] for f in other["features"]]
    logits = [f["properties"]["measurements"]["attention_logit"] for f in one["features"]]
    np.testing.assert_allclose(
        logits, [f["properties"]["measurements"]["attention_logit"] for f in other["features"]], rtol=1e-6
    )


@pytest.mark.parametrize(
    "args, exit_code, message",
    [
        (["--min-percentile", "101"], 2, "--min-percentile must be in [0, 100], got 101.0"),
        (["--top-k", "-1"], 2, "--top-k must be at least 0, got -1"),
        (["--patch-size", "0"], 2, "--patch-size must be positive, got 0.0"),
    ],
)
def test_bad_flags_are_one_line_usage_errors(tmp_path, args, exit_code, message):
    scores_table(tmp_path / "a.csv")
    result = invoke("geojson", tmp_path / "a.csv", "-o", tmp_path / "a.geojson", *args)
    assert result.exit_code == exit_code
    assert result.stderr.strip() == f"error: {message}"


def test_a_table_without_weights_fails_that_bag_only(tmp_path):
    scores_table(tmp_path / "good.csv", "good")
    scores_table(tmp_path / "bad.csv", "bad").drop(columns="attention_weight").to_csv(
        tmp_path / "bad.csv", index=False
    )
    out = tmp_path / "tiles"
    result = invoke("geojson", tmp_path / "bad.csv", tmp_path / "good.csv", "-o", out)
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    message = "bad: needs attention_logit and attention_weight columns (a table from score)"
    assert lines[0] == f"error: {tmp_path / 'bad.csv'}: {message}"
    assert lines[1] == f"smcli: wrote {out / 'good.geojson'} (30 tiles)"
    assert not (out / "bad.geojson").exists()


@settings(max_examples=80, deadline=None)
@given(
    cells=st.lists(
        st.tuples(st.integers(0, 10**6), st.integers(0, 10**6)), min_size=1, max_size=30, unique=True
    ),
    step=st.integers(1, 4096),
    top_k=st.integers(0, 40),
    min_percentile=st.floats(0, 100),
)
def test_every_kept_patch_is_its_exact_square(cells, step, top_k, min_percentile):
    """Any grid coords and step: exact integer squares, valid, the top-k classified, percentiles kept."""
    coords = np.array(cells, dtype=np.int64) * step
    logits = np.random.default_rng(len(cells)).standard_normal(len(cells))
    scores = {"attention_logit": logits, "attention_weight": np.exp(logits)}
    bag = BagValues("b", Path("b.csv"), coords, logits, "attention_logit", float(step), scores=scores)
    document = feature_collection(bag, top_k, min_percentile, "tile")
    check_structure(document)
    for feature in document["features"]:
        i = int(feature["id"])
        ring = feature["geometry"]["coordinates"][0]
        x, y = int(coords[i, 0]), int(coords[i, 1])
        assert ring == [[x, y], [x + step, y], [x + step, y + step], [x, y + step], [x, y]]
        assert shape(feature["geometry"]).is_valid
        assert feature["properties"]["measurements"]["attention_percentile"] >= min_percentile
    classified = sum("classification" in f["properties"] for f in document["features"])
    assert classified <= min(top_k, len(cells))
    if min_percentile == 0:
        assert len(document["features"]) == len(cells) and classified == min(top_k, len(cells))
