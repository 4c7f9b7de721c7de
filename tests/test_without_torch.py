"""torch is an extra (`smcli[torch]`): without it, the commands that need it say so in one line.

torch is hidden by a None entry in sys.modules (what `import torch` then raises is ImportError),
so these run the same in the torch-free venv and in the full one.
"""

from __future__ import annotations

import csv
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from smcli import scoring
from smcli.checkpoint import ModelConfig, PoolConfig, build_module, save_checkpoint
from smcli.cli import app
from tests.conftest import PATCH, tricky_coords

runner = CliRunner()
EXTRA = "pip install 'smcli[torch]'"


@pytest.fixture
def no_torch(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)


@pytest.fixture
def files(tmp_path, bag_file):
    coords = tricky_coords(0)
    features = np.random.default_rng(0).standard_normal((len(coords), 8), dtype=np.float32)
    bag = bag_file("slide", features, coords, patch_size=PATCH)
    config = ModelConfig(PoolConfig(8, 4), head=True)
    model = tmp_path / "model.safetensors"
    save_checkpoint(build_module(config).state_dict(), config, model)
    return bag, model


@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_torch_exits_2_naming_the_extra(no_torch, files, tmp_path, device):
    bag, model = files
    result = runner.invoke(
        app, ["score", str(bag), "-m", str(model), "-o", str(tmp_path / "out"), "--device", device]
    )
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        f"error: --device {device} needs PyTorch, which is not installed: {EXTRA}"
    ]
    assert not (tmp_path / "out").exists()


def test_convert_a_pt_file_without_torch_exits_2_naming_the_extra(no_torch, tmp_path):
    pt = tmp_path / "model.pt"
    pt.write_bytes(b"PK\x03\x04 not read without torch")
    result = runner.invoke(app, ["convert", str(pt), "-o", str(tmp_path / "model.safetensors")])
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        f"error: {pt}: reading a .pt/.ckpt training file needs PyTorch, which is not installed: {EXTRA}"
    ]
    assert not (tmp_path / "model.safetensors").exists()


def test_convert_of_a_missing_file_says_so_before_asking_for_torch(no_torch, tmp_path):
    result = runner.invoke(
        app, ["convert", str(tmp_path / "absent.pt"), "-o", str(tmp_path / "m.safetensors")]
    )
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [f"error: {tmp_path / 'absent.pt'}: no such file"]


def test_auto_with_an_nvidia_driver_but_no_torch_scores_on_the_cpu_with_one_note(
    no_torch, files, tmp_path, monkeypatch
):
    driver = tmp_path / "nvidia-version"
    driver.write_text("NVRM version: fake\n")
    monkeypatch.setattr(scoring, "NVIDIA_DRIVER", driver)
    bag, model = files
    out = tmp_path / "scores.csv"
    result = runner.invoke(app, ["score", str(bag), "-m", str(model), "-o", str(out)])
    assert result.exit_code == 0, result.stderr
    lines = result.stderr.splitlines()
    assert lines[0] == f"note: an NVIDIA driver is present but PyTorch is not: scoring on the CPU ({EXTRA})"
    assert sum(line.startswith("note: an NVIDIA driver") for line in lines) == 1
    assert "Traceback" not in result.stderr
    with open(tmp_path / "scores_bags.csv", newline="") as handle:
        assert [row["device"] for row in csv.DictReader(handle)] == ["cpu"]


def test_auto_fallback_note_is_silent_with_quiet(no_torch, files, tmp_path, monkeypatch):
    monkeypatch.setenv("SMCLI_PROBE_CUDA", "1")
    bag, model = files
    result = runner.invoke(
        app, ["score", str(bag), "-m", str(model), "-o", str(tmp_path / "s.csv"), "--quiet"]
    )
    assert result.exit_code == 0 and result.stderr == ""


def test_resolve_device_reports_the_fallback_through_its_note_hook(no_torch, monkeypatch):
    monkeypatch.setenv("SMCLI_PROBE_CUDA", "1")
    notes: list[str] = []
    assert scoring.resolve_device("auto", notes.append) == "cpu"
    assert len(notes) == 1 and EXTRA in notes[0]
    assert scoring.resolve_device("cpu", notes.append) == "cpu" and len(notes) == 1


def test_every_test_module_collects_without_torch():
    """CI runs the suite in a torch-free venv too: a module that imports torch, torchmil or
    safetensors.torch at its top level must first `pytest.importorskip` it (or import it inside the
    tests that need it), else that whole venv stops at collection."""
    import ast
    from pathlib import Path

    needs_torch = ("torch", "torchmil", "safetensors.torch", "tests.oracle")
    offenders = []
    for path in sorted(Path(__file__).parent.glob("*.py")):
        if path.name == "oracle.py":
            continue
        skipped = False
        for node in ast.parse(path.read_text()).body:
            call = node.value if isinstance(node, ast.Expr | ast.Assign) else None
            if isinstance(call, ast.Call) and ast.unparse(call.func) == "pytest.importorskip":
                skipped = True
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if not skipped and any(
                name == top or name.startswith(f"{top}.") for name in names for top in needs_torch
            ):
                offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []
