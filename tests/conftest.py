"""Shared fixtures: small tricky bags. Torch-free: the torchmil oracle lives in tests/oracle.py."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

PATCH = 256
HAVE_TORCH = importlib.util.find_spec("torch") is not None
needs_torch = pytest.mark.skipif(not HAVE_TORCH, reason="needs torch (not in the torch-free venv)")


def pytest_report_header(config) -> str:
    """Say whether the torchmil oracle is here: without it the parity tests skip."""
    present = HAVE_TORCH and importlib.util.find_spec("torchmil") is not None
    return "smcli oracle: torch + torchmil present" if present else "smcli oracle: absent (parity tests skip)"


def tricky_coords(seed: int = 0) -> np.ndarray:
    """Level-0 coords with holes, a ragged border, isolated patches and one duplicate cell."""
    rng = np.random.default_rng(seed)
    cells = [(x, y) for x in range(11) for y in range(8) if rng.random() < 0.72]
    cells += [(25, 3), (40, 40), (2, 30)]  # isolated patches
    cells.append(cells[5])  # two patches on one grid cell
    coords = np.array(cells, dtype=np.int64) * PATCH + np.array([10_000, 4_096])
    return coords[rng.permutation(len(coords))]


@pytest.fixture
def bag_file(tmp_path):
    """Write a safetensors bag and return its path: bag_file(name, features, coords, **metadata).

    `features` is a numpy array, or a torch tensor (e.g. bfloat16, which numpy lacks)."""

    def write(name: str, features, coords, **metadata) -> str:
        path = tmp_path / f"{name}.safetensors"
        meta = {k: str(v) for k, v in metadata.items()} or None
        coords = np.ascontiguousarray(coords)
        if isinstance(features, np.ndarray):
            from safetensors.numpy import save_file

            save_file(
                {"features": np.ascontiguousarray(features), "coords": coords}, str(path), metadata=meta
            )
        else:  # a torch tensor: only tests that have torch pass one
            import torch
            from safetensors.torch import save_file as save_torch

            tensors = {"features": features.contiguous(), "coords": torch.as_tensor(coords)}
            save_torch(tensors, str(path), metadata=meta)
        return path

    return write
