"""The same scores on CUDA as on the CPU. Skipped on machines without a CUDA device."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("torch")
import torch
from typer.testing import CliRunner

from smcli.checkpoint import ModelConfig, PoolConfig, build_module, save_checkpoint
from smcli.cli import app
from smcli.graph import build_adjacency, grid_cells
from tests.conftest import PATCH, tricky_coords

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("mode", ["approx", "exact"])
@pytest.mark.parametrize("where", ["early", "mid", "late"])
def test_cuda_matches_cpu(mode, where):
    model = build_module(ModelConfig(PoolConfig(32, 8, "gelu", mode, "trainable", 10, where), head=True))
    coords = tricky_coords(1)
    features = torch.randn(len(coords), 32, generator=torch.Generator().manual_seed(0)).half().numpy()
    adjacency = build_adjacency(grid_cells(coords, PATCH))
    on_cpu = model.attention(features, adjacency, symmetric=True)  # numpy + scipy
    model.to("cuda")
    on_gpu = model.attention(features, adjacency, symmetric=True)
    assert isinstance(on_gpu.attention_logit, torch.Tensor) and on_gpu.attention_logit.is_cuda
    assert np.abs(on_cpu.attention_logit - on_gpu.attention_logit.cpu().numpy()).max() <= 1e-5
    assert abs(on_cpu.bag_logit - on_gpu.bag_logit) <= 1e-5


def test_score_with_device_cuda_gives_the_cpu_table(tmp_path, bag_file):
    config = ModelConfig(PoolConfig(16, 4), head=True)
    model_path = tmp_path / "model.safetensors"
    save_checkpoint(build_module(config).state_dict(), config, model_path)
    coords = tricky_coords(2)
    bag = bag_file("b", torch.randn(len(coords), 16), coords, patch_size=PATCH)
    runner = CliRunner()
    tables = {}
    for device in ("cpu", "cuda"):
        result = runner.invoke(app, ["score", str(bag), "-m", str(model_path), "--device", device])
        assert result.exit_code == 0, result.stderr
        tables[device] = pd.read_csv(io.StringIO(result.stdout))
    assert np.abs(tables["cpu"]["attention_logit"] - tables["cuda"]["attention_logit"]).max() <= 1e-5
