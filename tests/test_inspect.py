"""`smcli inspect`: a bag's geometry and graph, a checkpoint's config, one error line for junk."""

from __future__ import annotations

import hashlib
import json

import numpy as np
from safetensors.numpy import save_file
from typer.testing import CliRunner

from smcli.checkpoint import ModelConfig, PoolConfig, build_module, save_checkpoint
from smcli.cli import app
from smcli.inspect import inspect_file
from tests.test_h5bags import IN_DIM, LEVEL0_STEP, TILE_UM, layout_data, trident_bag, write_clam, write_stamp

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def make_checkpoint(path, head=True, patch_size=None):
    config = ModelConfig(PoolConfig(IN_DIM, 6, act="tanh"), head=head, patch_size=patch_size)
    save_checkpoint(build_module(config).state_dict(), config, path)
    return path


def test_trident_geometry_in_text(tmp_path):
    path, features, coords = trident_bag(tmp_path)
    result = invoke("inspect", path)
    assert result.exit_code == 0, result.stderr
    text = result.stdout
    assert f"{path}  (bag)" in text
    assert "format      trident" in text
    assert f"features ({len(coords)}, {IN_DIM}) float32" in text
    assert "int64, level-0 pixels" in text
    assert "patch step  512 (bag: coords.attrs['patch_size_level0'])" in text
    assert "warning" not in text
    assert result.stderr == ""


def test_wrong_patch_size_warns_of_an_edgeless_graph(tmp_path):
    path, _, coords = trident_bag(tmp_path)
    result = invoke("inspect", path, "--patch-size", "256")
    assert result.exit_code == 0, result.stderr
    assert "patch step  256 (flag: --patch-size)" in result.stdout
    assert "graph       0 edges, mean degree 0.00" in result.stdout
    assert "warning: graph has no edges at patch step 256 (flag); the coords suggest a step of 512" in (
        result.stdout
    )

    document = json.loads(invoke("inspect", path, "--patch-size", "256", "--json").stdout)
    assert document[0]["n_edges"] == 0 and document[0]["patch_step"] == 256
    assert any("no edges" in w for w in document[0]["warnings"])


def test_json_is_one_document_describing_every_file(tmp_path):
    trident, _, coords = trident_bag(tmp_path)
    features, stamp_coords, _ = layout_data("stamp")
    stamp = write_stamp(tmp_path / "s.h5", features, stamp_coords)
    clam = write_clam(tmp_path / "c.h5", *layout_data("clam")[:2])
    result = invoke("inspect", trident, stamp, clam, "--json")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert [d["format"] for d in document] == ["trident", "stamp", "clam"]
    first, second, third = document
    assert first["n_instances"] == len(coords) and first["feature_dim"] == IN_DIM
    assert {t["name"] for t in first["tensors"]} == {"coords", "features"}
    assert first["attributes"]["coords"]["patch_size_level0"] == LEVEL0_STEP
    assert first["n_edges"] > 0 and first["mean_degree"] > 2 and first["isolated"] >= 1
    assert second["coords_units"] == "micrometres" and second["features_dtype"] == "float16"
    assert second["patch_step"] == TILE_UM and second["patch_step_origin"] == "attrs['tile_size_um']"
    assert third["coords_units"] == "level-0 pixels"
    assert third["patch_step_source"] == "inferred" and third["patch_step"] == 256


def test_checkpoint_info(tmp_path):
    path = make_checkpoint(tmp_path / "model.safetensors")
    result = invoke("inspect", path, "--json")
    assert result.exit_code == 0, result.stderr
    (info,) = json.loads(result.stdout)
    module = build_module(ModelConfig(PoolConfig(IN_DIM, 6, act="tanh"), head=True))
    assert info["kind"] == "checkpoint" and info["model"] == "SmABMIL"
    assert info["in_dim"] == IN_DIM and info["head"] is True
    assert info["n_parameters"] == sum(t.size for t in module.state_dict().values())
    assert info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert info["config"]["pool"]["act"] == "tanh" and info["config"]["pool"]["att_dim"] == 6
    text = invoke("inspect", path).stdout
    assert "model       SmABMIL (in_dim 12, head yes)" in text
    assert f"sha256      {info['sha256']}" in text


def test_model_gives_the_step_and_a_dim_warning(tmp_path):
    cells = np.argwhere(np.ones((5, 4)))
    bag = tmp_path / "b.safetensors"
    coords = np.ascontiguousarray(cells * 100 + 700)
    features = np.random.default_rng(0).standard_normal((len(cells), IN_DIM + 1), dtype=np.float32)
    save_file({"features": features, "coords": coords}, str(bag))
    model = make_checkpoint(tmp_path / "m.safetensors", head=False, patch_size=100.0)
    (info,) = json.loads(invoke("inspect", bag, "-m", model, "--json").stdout)
    assert info["patch_step_source"] == "model" and info["patch_step"] == 100
    assert info["format"] == "safetensors" and info["coords_units"] == "level-0 pixels"
    assert info["warnings"] == [f"features have {IN_DIM + 1} columns, the model expects {IN_DIM}"]
    assert info["n_edges"] == inspect_file(bag, patch_size=100.0)["n_edges"] > 0


def test_a_file_that_is_neither_fails_alone(tmp_path):
    path, _, _ = trident_bag(tmp_path)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"nothing to see")
    result = invoke("inspect", junk, path, "--json")
    assert result.exit_code == 1
    document = json.loads(result.stdout)
    assert [d["kind"] for d in document] == ["error", "bag"]
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith(f"error: {junk}: not a safetensors bag")

    text = invoke("inspect", junk, path)
    assert text.exit_code == 1 and "format      trident" in text.stdout


def test_bad_model_exits_2(tmp_path):
    path, _, _ = trident_bag(tmp_path)
    result = invoke("inspect", path, "-m", tmp_path / "nope.safetensors")
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: {tmp_path / 'nope.safetensors'}: no such model file"
