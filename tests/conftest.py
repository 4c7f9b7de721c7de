"""Shared fixtures: small tricky bags and the torchmil oracle (a test-only dependency)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

PATCH = 256


def tricky_coords(seed: int = 0) -> np.ndarray:
    """Level-0 coords with holes, a ragged border, isolated patches and one duplicate cell."""
    rng = np.random.default_rng(seed)
    cells = [(x, y) for x in range(11) for y in range(8) if rng.random() < 0.72]
    cells += [(25, 3), (40, 40), (2, 30)]  # isolated patches
    cells.append(cells[5])  # two patches on one grid cell
    coords = np.array(cells, dtype=np.int64) * PATCH + np.array([10_000, 4_096])
    return coords[rng.permutation(len(coords))]


def torchmil_adjacency(
    coords: np.ndarray, patch_size: float, dist_thr: float = 2**0.5, normalize: bool = True
) -> torch.Tensor:
    """torchmil 1.0.2's sparse adjacency, built as its WSI datasets do (float32): normalized, or the
    raw binary one (norm_adj=False)."""
    from torchmil.utils import add_self_loops, build_adj, normalize_adj

    cells = coords / patch_size
    cells = (cells - cells.min(axis=0)).astype(int)
    n = len(coords)
    edge_index, edge_weight = build_adj(cells, None, dist_thr=dist_thr)
    weight = normalize_adj(edge_index, edge_weight, n_nodes=n) if normalize else edge_weight
    if n == 1:
        edge_index, weight = add_self_loops(edge_index, weight, n)
    adj = torch.sparse_coo_tensor(edge_index, weight, (n, n), check_invariants=True)
    return adj.coalesce().to(torch.float32)


def make_torchmil_model(
    in_dim,
    att_dim,
    head,
    mode="approx",
    where="early",
    spectral=False,
    alpha="trainable",
    act="tanh",
    steps=10,
):
    """A torchmil SmABMIL (head) or SmAttentionPool with these constructor settings."""
    from torchmil.models import SmABMIL
    from torchmil.nn import SmAttentionPool

    if head:
        return SmABMIL(
            (in_dim,),
            att_dim=att_dim,
            att_act=act,
            sm_mode=mode,
            sm_alpha=alpha,
            sm_steps=steps,
            sm_where=where,
            spectral_norm=spectral,
        )
    return SmAttentionPool(in_dim, att_dim, act, mode, alpha, steps, where, spectral)


@pytest.fixture
def bag_file(tmp_path):
    """Write a safetensors bag and return its path: bag_file(name, features, coords, **metadata)."""

    def write(name: str, features: torch.Tensor, coords, **metadata) -> str:
        path = tmp_path / f"{name}.safetensors"
        tensors = {"features": features.contiguous(), "coords": torch.as_tensor(np.ascontiguousarray(coords))}
        save_file(tensors, str(path), metadata={k: str(v) for k, v in metadata.items()} or None)
        return path

    return write
