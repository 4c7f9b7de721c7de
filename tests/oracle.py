"""The torchmil oracle (test-only; needs the `oracle` extra: torch + torchmil 1.0.2).

Imported only by the tests that compare against torchmil, each of which skips cleanly
(`pytest.importorskip`) where torch is not installed, so the CPU tests run in a torch-free venv.
"""

from __future__ import annotations

import numpy as np
import torch


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
