"""Remaining one-line errors of `smcli score`, each with its exit code."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from smcli.checkpoint import ModelConfig, PoolConfig, build_module, save_checkpoint
from smcli.cli import app
from tests.conftest import PATCH, tricky_coords

runner = CliRunner()


def randn(*shape: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal(shape, dtype=np.float32)


def model_file(tmp_path, mode="approx", coef=None):
    config = ModelConfig(PoolConfig(8, 4, "gelu", mode))
    state = build_module(config).state_dict()
    if coef is not None:
        state["sm.sm.coef"] = np.array(coef, dtype=np.float32)
    path = tmp_path / f"{mode}.safetensors"
    save_checkpoint(state, config, path)
    return path


@pytest.fixture
def bag(bag_file):
    coords = tricky_coords(0)
    return bag_file("slide", randn(len(coords), 8), coords, patch_size=PATCH)


def invoke(*args):
    return runner.invoke(app, ["score", *map(str, args), "--device", "cpu"])


def test_parquet_to_stdout_is_a_usage_error(tmp_path, bag):
    result = invoke(bag, "-m", model_file(tmp_path), "--format", "parquet")
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: parquet needs an output file or directory (-o)"


def test_format_contradicting_the_file_name_is_a_usage_error(tmp_path, bag):
    result = invoke(bag, "-m", model_file(tmp_path), "-o", tmp_path / "x.csv", "--format", "parquet")
    assert result.exit_code == 2
    assert "--format parquet contradicts the output file name" in result.stderr


def test_a_directory_without_bags_is_a_usage_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = invoke(empty, "-m", model_file(tmp_path))
    assert result.exit_code == 2
    assert f"no bags found in {empty}" in result.stderr


def test_an_indefinite_exact_system_is_solved_and_a_singular_one_fails_the_bag(tmp_path, bag, bag_file):
    result = invoke(bag, "-m", model_file(tmp_path, "exact", coef=-0.7), "-o", tmp_path / "out")
    assert result.exit_code == 0, result.stderr  # 0.3 I + 0.7 A: indefinite, solved by sparse LU
    pair = bag_file("pair", randn(2, 8), np.array([[0, 0], [PATCH, 0]]), patch_size=PATCH)
    result = invoke(pair, "-m", model_file(tmp_path, "exact", coef=-0.5), "-o", tmp_path / "out2")
    assert result.exit_code == 1  # two neighbours: A has eigenvalue -1, so 0.5 I + 0.5 A is singular
    reason = "exact Sm with coef -0.5: (1 + coef) I - coef A is singular"
    assert result.stderr.splitlines()[0] == f"error: {pair}: {reason}"


def test_a_patch_step_far_too_large_fails_the_bag_not_the_machine(tmp_path, bag_file):
    coords = np.argwhere(np.ones((40, 40))) * 512
    big = bag_file("big", randn(len(coords), 8), coords)
    result = invoke(big, "-m", model_file(tmp_path), "--patch-size", "1000000", "-o", tmp_path / "out")
    assert result.exit_code == 1
    assert "the patch step is far too large for these coords" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_inferred_patch_step_is_said_on_stderr(tmp_path, bag_file):
    coords = tricky_coords(3)
    bag = bag_file("no_step", randn(len(coords), 8), coords)  # no patch_size metadata
    result = invoke(bag, "-m", model_file(tmp_path))
    assert result.exit_code == 0
    assert f"note: {bag}: patch step {PATCH} inferred from the coords" in result.stderr.splitlines()
    assert invoke(bag, "-m", model_file(tmp_path), "--quiet").stderr == ""


@pytest.mark.parametrize(
    "args,message",
    [
        (["score"], "Error: Missing argument 'inputs'."),
        (["score", "x.safetensors", "-m", "m.safetensors", "--bogus"], "Error: No such option: --bogus"),
        (["inspect", "--json"], "Error: Missing argument 'files'."),
    ],
)
def test_usage_errors_are_two_plain_lines_not_a_boxed_panel(args, message):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "smcli", *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [message, f"Try 'python -m smcli {args[0]} -h' for help."]
    assert done.stdout == ""


def test_a_dist_thr_just_below_sqrt_2_warns_once(tmp_path):
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    bag = root / "sample_bags" / "slide_01.safetensors"
    model = root / "sample_bags" / "models" / "sm_abmil.safetensors"
    result = CliRunner().invoke(
        app, ["score", str(bag), "-m", str(model), "--dist-thr", "1.414213562", "-o", str(tmp_path / "s.csv")]
    )
    assert result.exit_code == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [
        "warning: --dist-thr 1.414213562 is just below √2 = 1.4142135623730951 patch steps: neighbours "
        "exactly √2 apart get no edge; give 1.414214 or more to keep them"
    ]
    quiet = CliRunner().invoke(
        app, ["score", str(bag), "-m", str(model), "--dist-thr", "1.5", "-o", str(tmp_path / "t.csv")]
    )
    assert "warning:" not in quiet.stderr
