"""The CLI, in-process through one CliRunner: output modes, streams and exit codes."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

pytest.importorskip("torchmil")
import torch
from torchmil.nn import SmAttentionPool as TorchmilPool
from typer.testing import CliRunner

from smcli.checkpoint import ModelConfig, PoolConfig, save_checkpoint
from smcli.cli import app
from tests.conftest import PATCH, tricky_coords
from tests.oracle import torchmil_adjacency

IN_DIM = 12
COLUMNS = ["bag_id", "instance", "x", "y", "attention_logit", "attention_weight"]
BAGS_COLUMNS = [
    "bag_id",
    "path",
    "n_instances",
    "n_edges",
    "logit",
    "probability",
    "status",
    "error",
    "seconds",
]

runner = CliRunner()


def invoke(*args, env=None):
    return runner.invoke(app, [str(a) for a in args], env=env)


@pytest.fixture
def oracle():
    torch.manual_seed(0)
    pool = TorchmilPool(IN_DIM, 5)
    state = pool.state_dict()
    state["sm.sm.coef"] = torch.tensor(1.6)
    pool.load_state_dict(state)
    return pool.eval()


@pytest.fixture
def model_file(tmp_path, oracle):
    path = tmp_path / "models" / "pool.safetensors"
    path.parent.mkdir()
    save_checkpoint(oracle.state_dict(), ModelConfig(PoolConfig(IN_DIM, 5)), path)
    return path


@pytest.fixture
def bags(tmp_path, bag_file):
    """Two bags in tmp_path/bags: slide_a (tricky geometry) and slide_b (a small grid)."""
    directory = tmp_path / "bags"
    directory.mkdir()
    made = {}
    for name, coords in (("slide_a", tricky_coords(0)), ("slide_b", np.argwhere(np.ones((6, 4))) * PATCH)):
        features = torch.randn(len(coords), IN_DIM, generator=torch.Generator().manual_seed(len(coords)))
        path = bag_file(name, features, coords, patch_size=PATCH)
        made[name] = (path.rename(directory / path.name), features, coords)
    return made


def expected_logits(oracle, features, coords):
    with torch.no_grad():
        return oracle(features[None], torchmil_adjacency(coords, PATCH)[None], return_att=True)[1][0].numpy()


def test_one_bag_to_stdout_is_csv_only(bags, model_file, oracle):
    path, features, coords = bags["slide_a"]
    result = invoke("score", path, "-m", model_file)
    assert result.exit_code == 0, result.stderr
    table = pd.read_csv(io.StringIO(result.stdout))
    assert list(table.columns) == COLUMNS
    assert table["instance"].tolist() == list(range(len(coords)))
    assert table[["x", "y"]].to_numpy().tolist() == coords.tolist()
    assert (
        np.abs(table["attention_logit"].to_numpy() - expected_logits(oracle, features, coords)).max() <= 1e-5
    )
    assert table["attention_weight"].sum() == pytest.approx(1.0, abs=1e-5)
    assert "1 ok, 0 skipped, 0 failed" in result.stderr


def test_model_from_environment(bags, model_file):
    result = invoke("score", bags["slide_b"][0], env={"SMCLI_MODEL": str(model_file)})
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith(",".join(COLUMNS))


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_single_table_holds_all_bags(tmp_path, bags, model_file, suffix):
    out = tmp_path / f"scores{suffix}"
    result = invoke("score", tmp_path / "bags", "-m", model_file, "-o", out)
    assert result.exit_code == 0, result.stderr
    table = pd.read_csv(out) if suffix == ".csv" else pd.read_parquet(out)
    assert list(table.columns) == COLUMNS
    assert table["bag_id"].unique().tolist() == ["slide_a", "slide_b"]
    assert len(table) == sum(len(coords) for _, _, coords in bags.values())
    summary = pd.read_csv(tmp_path / "scores_bags.csv")
    assert summary["status"].tolist() == ["ok", "ok"]
    assert result.stdout == ""


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_directory_output_writes_one_file_per_bag_and_bags_csv(tmp_path, bags, model_file, oracle, fmt):
    out = tmp_path / "out"
    result = invoke("score", tmp_path / "bags", "-m", model_file, "-o", out, "--format", fmt)
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in out.iterdir() if p.name[0] != ".") == [
        "_bags.csv",
        f"slide_a.{fmt}",
        f"slide_b.{fmt}",
    ]
    for name, (_, features, coords) in bags.items():
        table = (
            pd.read_csv(out / f"{name}.csv")
            if fmt == "csv"
            else pq.read_table(out / f"{name}.parquet").to_pandas()
        )
        assert list(table.columns) == COLUMNS
        assert (
            np.abs(table["attention_logit"].to_numpy() - expected_logits(oracle, features, coords)).max()
            <= 1e-5
        )
    summary = pd.read_csv(out / "_bags.csv")
    assert list(summary.columns[: len(BAGS_COLUMNS)]) == BAGS_COLUMNS
    assert summary["n_instances"].tolist() == [len(bags["slide_a"][2]), len(bags["slide_b"][2])]
    assert summary["logit"].isna().all() and summary["probability"].isna().all()  # no head
    assert (summary["n_edges"] > 0).all()


def test_a_bad_bag_fails_alone_with_exit_1(tmp_path, bags, model_file):
    (tmp_path / "bags" / "broken.safetensors").write_bytes(b"garbage")
    out = tmp_path / "out"
    result = invoke("score", tmp_path / "bags", "-m", model_file, "-o", out)
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "broken.safetensors" in errors[0]
    assert (out / "slide_a.csv").exists() and (out / "slide_b.csv").exists()
    summary = pd.read_csv(out / "_bags.csv").set_index("bag_id")
    assert summary.loc["broken", "status"] == "error"
    assert "broken.safetensors" in summary.loc["broken", "error"]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["--no-such-flag"], "No such option"),
        (["--device", "tpu"], "unknown device 'tpu'"),
        (["--format", "xlsx", "-o", "OUT"], "unknown format 'xlsx'"),
        (["--patch-size", "-3"], "--patch-size must be positive"),
    ],
)
def test_usage_errors_exit_2(tmp_path, bags, model_file, args, message):
    args = [str(tmp_path / "o") if a == "OUT" else a for a in args]
    result = invoke("score", bags["slide_a"][0], "-m", model_file, *args)
    assert result.exit_code == 2
    assert message in result.stderr
    assert result.stdout == ""


def test_missing_input_exits_2(tmp_path, model_file):
    result = invoke("score", tmp_path / "nope.safetensors", "-m", model_file)
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: {tmp_path / 'nope.safetensors'}: no such file or directory"


def test_invalid_model_exits_2(tmp_path, bags):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"{}")
    result = invoke("score", bags["slide_a"][0], "-m", bad)
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {bad}: not a safetensors checkpoint")
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_without_cuda_exits_2(bags, model_file):
    result = invoke("score", bags["slide_a"][0], "-m", model_file, "--device", "cuda")
    assert result.exit_code == 2
    assert "CUDA is not available" in result.stderr


def test_convert_then_score_through_the_cli(tmp_path, bags, oracle):
    pt = tmp_path / "state.pt"
    torch.save(oracle.state_dict(), pt)
    out = tmp_path / "converted.safetensors"
    result = invoke("convert", pt, "-o", out, "--act", "gelu", "--assume-defaults")
    assert result.exit_code == 0, result.stderr
    assert f"wrote {out}" in result.stderr
    path, features, coords = bags["slide_a"]
    scored = invoke("score", path, "-m", out)
    table = pd.read_csv(io.StringIO(scored.stdout))
    assert (
        np.abs(table["attention_logit"].to_numpy() - expected_logits(oracle, features, coords)).max() <= 1e-5
    )


def test_convert_bad_alpha_exits_2(tmp_path, oracle):
    pt = tmp_path / "state.pt"
    torch.save(oracle.state_dict(), pt)
    result = invoke("convert", pt, "-o", tmp_path / "x.safetensors", "--sm-alpha", "1.5")
    assert result.exit_code == 2
    assert "--sm-alpha must be in [0, 1)" in result.stderr


def test_every_command_has_help_with_an_example():
    for command in app.registered_commands:
        name = command.name or command.callback.__name__
        result = invoke(name, "--help")
        assert result.exit_code == 0
        assert "Example:" in result.stdout, name


def test_installed_console_script_and_module(tmp_path, bags, model_file):
    scripts = Path(sys.executable).parent
    env = {**os.environ, "SMCLI_MODEL": str(model_file)}
    done = subprocess.run(
        [str(scripts / "smcli"), "score", str(bags["slide_b"][0])],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == ",".join(COLUMNS)
    helped = subprocess.run(
        [sys.executable, "-m", "smcli", "--help"], capture_output=True, text=True, timeout=60
    )
    assert helped.returncode == 0 and "score" in helped.stdout
