"""How every number was made: parquet metadata, _bags.csv provenance, reproducible files, --top-k."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from smcli import __version__
from smcli.checkpoint import ModelConfig, PoolConfig, build_module, file_sha256, save_checkpoint
from smcli.cli import app
from tests.conftest import PATCH, tricky_coords

runner = CliRunner()


@pytest.fixture
def model_path(tmp_path):
    config = ModelConfig(PoolConfig(16, 4), head=True)
    path = tmp_path / "model.safetensors"
    save_checkpoint(build_module(config).state_dict(), config, path)
    return path


@pytest.fixture
def bags(tmp_path, bag_file):
    made = []
    for seed in (1, 2):
        coords = tricky_coords(seed)
        features = np.random.default_rng(seed).standard_normal((len(coords), 16), dtype=np.float32)
        made.append(bag_file(f"slide_{seed}", features, coords, patch_size=PATCH))
    return made


def score(*args):
    result = runner.invoke(app, ["score", *map(str, args), "--device", "cpu"])
    assert result.exit_code == 0, result.stderr
    return result


def test_parquet_tables_carry_provenance(tmp_path, bags, model_path):
    out = tmp_path / "out"
    score(bags[0], "-m", model_path, "-o", out, "--format", "parquet")
    metadata = {k.decode(): v.decode() for k, v in pq.read_metadata(out / "slide_1.parquet").metadata.items()}
    assert metadata["smcli.smcli_version"] == __version__
    assert metadata["smcli.model_sha256"] == file_sha256(model_path)
    assert json.loads(metadata["smcli.model_config"])["pool"]["in_dim"] == 16
    assert metadata["smcli.patch_step"] == str(float(PATCH))
    assert metadata["smcli.patch_step_source"] == "bag"
    assert metadata["smcli.dist_thr"] == str(2**0.5)
    assert int(metadata["smcli.n_edges"]) > 0
    assert metadata["smcli.input_path"] == str(bags[0])
    assert int(metadata["smcli.input_bytes"]) == bags[0].stat().st_size
    assert metadata["smcli.device"] == "cpu"


def test_single_parquet_table_lists_every_bag(tmp_path, bags, model_path):
    out = tmp_path / "all.parquet"
    score(*bags, "-m", model_path, "-o", out)
    metadata = {k.decode(): v.decode() for k, v in pq.read_metadata(out).metadata.items()}
    assert metadata["smcli.model_sha256"] == file_sha256(model_path)  # shared by all bags
    per_bag = json.loads(metadata["smcli.bags"])
    assert [entry["smcli.bag_id"] for entry in per_bag] == ["slide_1", "slide_2"]


def test_bags_csv_carries_provenance_columns(tmp_path, bags, model_path):
    out = tmp_path / "out"
    score(bags[0], "-m", model_path, "-o", out)
    row = pd.read_csv(out / "_bags.csv").iloc[0]
    assert row["model_sha256"] == file_sha256(model_path)
    assert row["patch_step"] == PATCH and row["patch_step_source"] == "bag"
    assert row["smcli_version"] == __version__ and row["device"] == "cpu"
    assert row["input_bytes"] == bags[0].stat().st_size
    assert row["scored_at"].endswith("+00:00")


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_same_inputs_give_the_same_files_bit_for_bit(tmp_path, bags, model_path, fmt):
    for run in ("first", "second"):
        score(*bags, "-m", model_path, "-o", tmp_path / run, "--format", fmt)
    for name in ("slide_1", "slide_2"):
        first = (tmp_path / "first" / f"{name}.{fmt}").read_bytes()
        assert first == (tmp_path / "second" / f"{name}.{fmt}").read_bytes()


def test_top_k_keeps_the_highest_attention_ranked_ties_by_instance(tmp_path, bags, model_path):
    out_all, out_top = tmp_path / "all.csv", tmp_path / "top.csv"
    score(bags[0], "-m", model_path, "-o", out_all)
    score(bags[0], "-m", model_path, "-o", out_top, "--top-k", "5")
    every, top = pd.read_csv(out_all), pd.read_csv(out_top)
    expected = every.sort_values(["attention_logit", "instance"], ascending=[False, True]).head(5)
    assert top["instance"].tolist() == expected["instance"].tolist()
    assert np.array_equal(top["attention_weight"], expected["attention_weight"])  # not renormalized


def test_top_k_ties_are_broken_by_instance_index():
    from smcli.scoring import _arrow_column

    logits = np.array([0.5, 2.0, 2.0, -1.0, 2.0], dtype=np.float32)
    order = np.argsort(-logits, kind="stable")[:3]
    assert order.tolist() == [1, 2, 4]
    assert _arrow_column(order).to_pylist() == [1, 2, 4]


def test_top_k_must_be_positive(bags, model_path):
    result = runner.invoke(app, ["score", str(bags[0]), "-m", str(model_path), "--top-k", "0"])
    assert result.exit_code == 2
    assert "--top-k must be at least 1" in result.stderr


def test_shell_completion_is_available():
    result = runner.invoke(app, ["--show-completion"], env={"SHELL": "/bin/bash"})
    assert result.exit_code == 0
    assert "smcli" in result.stdout and "complete" in result.stdout
