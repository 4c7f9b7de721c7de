"""Parity with torchmil 1.0.2 (computed here), and the identities the fast path relies on."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchmil.models import SmABMIL as TorchmilSmABMIL
from torchmil.nn import SmAttentionPool as TorchmilPool

from smcli.checkpoint import ModelConfig, PoolConfig, build_module
from smcli.graph import build_adjacency, grid_cells
from smcli.model import SmSolveError, approx_sm, exact_sm, is_symmetric
from tests.conftest import PATCH, torchmil_adjacency, tricky_coords

IN_DIM, ATT_DIM = 24, 8
ALPHAS = ["trainable", 0.5, 0.9]
CONFIGS = list(
    itertools.product(
        ["approx", "exact"],
        ["early", "mid", "late", "none"],
        [False, True],
        ALPHAS,
        ["tanh", "relu", "gelu"],
        [False, True],
    )
)
BAGS = {"tricky": tricky_coords(0), "single": np.array([[512, 1024]])}


def torchmil_model(mode, where, spectral, alpha, act, head, seed=0):
    torch.manual_seed(seed)
    if head:
        model = TorchmilSmABMIL(
            (IN_DIM,),
            att_dim=ATT_DIM,
            att_act=act,
            sm_mode=mode,
            sm_alpha=alpha,
            sm_where=where,
            spectral_norm=spectral,
        )
        prefix = "pool."
    else:
        model = TorchmilPool(IN_DIM, ATT_DIM, act, mode, alpha, 10, where, spectral)
        prefix = ""
    state = model.state_dict()
    if f"{prefix}sm.sm.coef" in state:
        state[f"{prefix}sm.sm.coef"] = torch.tensor(2.7)  # a trained coefficient, not the init 1.0
    model.load_state_dict(state)
    return model.eval()


def smcli_model(mode, where, spectral, alpha, act, head):
    config = ModelConfig(PoolConfig(IN_DIM, ATT_DIM, act, mode, alpha, 10, where, spectral), head=head)
    return build_module(config)


@pytest.fixture(scope="module")
def features():
    generator = torch.Generator().manual_seed(5)
    return {name: torch.randn(len(coords), IN_DIM, generator=generator) for name, coords in BAGS.items()}


@pytest.mark.parametrize("bag", sorted(BAGS))
@pytest.mark.parametrize("mode,where,spectral,alpha,act,head", CONFIGS)
def test_attention_logits_match_torchmil(bag, features, mode, where, spectral, alpha, act, head):
    coords = BAGS[bag]
    X = features[bag]
    oracle = torchmil_model(mode, where, spectral, alpha, act, head)
    adj_sparse = torchmil_adjacency(coords, PATCH)
    # torchmil's exact mode solves a dense system; its approx mode takes the sparse matrix
    adj = adj_sparse.to_dense() if mode == "exact" else adj_sparse
    with torch.no_grad():
        out = oracle(X[None], adj[None], return_att=True)
    expected_logits = out[1][0]

    ours = smcli_model(mode, where, spectral, alpha, act, head)
    ours.load_state_dict(oracle.state_dict(), strict=True)
    adjacency = build_adjacency(grid_cells(coords, PATCH)).to_torch(torch.float32)
    result = ours.attention(X, adjacency)
    assert (result.attention_logit - expected_logits).abs().max() <= 1e-5
    reference = ours.forward_reference(X, adjacency)
    if head:
        assert abs(result.bag_logit - float(out[0][0])) <= 1e-5
        assert abs(float(reference[0]) - float(out[0][0])) <= 1e-5
    else:
        assert result.bag_logit is None
        assert (reference[0] - out[0][0]).abs().max() <= 1e-5  # z, the bag vector
    assert (reference[1] - expected_logits).abs().max() <= 1e-5


@pytest.mark.parametrize(
    "alpha,steps,where", [(0.0, 10, "early"), (0.5, 0, "mid"), ("trainable", 10, "none")]
)
def test_no_sm_configurations_are_identity(features, alpha, steps, where):
    model = build_module(ModelConfig(PoolConfig(IN_DIM, ATT_DIM, "gelu", "approx", alpha, steps, where)))
    assert isinstance(model.sm, torch.nn.Identity)
    oracle = TorchmilPool(IN_DIM, ATT_DIM, "gelu", "approx", alpha, steps, where)
    assert set(oracle.state_dict()) == set(model.state_dict())
    model.load_state_dict(oracle.state_dict(), strict=True)
    coords = BAGS["tricky"]
    adj = torchmil_adjacency(coords, PATCH)[None]
    if where != "none":
        # torchmil quirk: it swaps Sm for nn.Identity but still calls it with (X, adj), a
        # TypeError. Such a model cannot run in torchmil; smcli scores it as the Sm-free model.
        with pytest.raises(TypeError):
            oracle(features["tricky"][None], adj, return_att=True)
        oracle.sm_where = "none"
    with torch.no_grad():
        _, expected = oracle(features["tricky"][None], adj, return_att=True)
    adjacency = build_adjacency(grid_cells(coords, PATCH)).to_torch(torch.float32)
    assert (model.attention(features["tricky"], adjacency).attention_logit - expected[0]).abs().max() <= 1e-6


def test_float_alpha_means_different_operators_in_approx_and_exact():
    """torchmil's quirk: alpha 0.9 gives coef 9. Exact smooths with weight coef/(1+coef) = 0.9 = alpha,
    approx with a = 1/(1+coef) = 0.1 = 1 - alpha: its fixed point is exact Sm with coef 1/9."""
    coords = BAGS["tricky"]
    adjacency = build_adjacency(grid_cells(coords, PATCH)).to_torch(torch.float64)
    signal = torch.randn(len(coords), 3, dtype=torch.float64)
    coef = 1 / (1 - 0.9) - 1
    converged = approx_sm(signal, adjacency, coef, 200)
    assert torch.allclose(converged, exact_sm(signal, adjacency, 1 / coef), atol=1e-9)
    assert not torch.allclose(converged, exact_sm(signal, adjacency, coef), atol=1e-2)
    one_step = approx_sm(signal, adjacency, coef, 1)
    assert torch.allclose(one_step, 0.9 * signal + 0.1 * (adjacency @ signal))


def test_commuted_smoothing_identities():
    """Sm(X) W^T = Sm(X W^T) and w.(Sm(X)^T s) = s.Sm(X w), for both modes, checked directly."""
    coords = BAGS["tricky"]
    adjacency = build_adjacency(grid_cells(coords, PATCH)).to_torch(torch.float64)
    generator = torch.Generator().manual_seed(1)
    X = torch.randn(len(coords), 16, dtype=torch.float64, generator=generator)
    W = torch.randn(5, 16, dtype=torch.float64, generator=generator)
    s = torch.softmax(torch.randn(len(coords), dtype=torch.float64, generator=generator), 0)
    for smooth in (lambda v: approx_sm(v, adjacency, 1.7, 10), lambda v: exact_sm(v, adjacency, 1.7)):
        assert torch.allclose(smooth(X) @ W.T, smooth(X @ W.T), atol=1e-10)
        assert torch.allclose(W[0] @ (smooth(X).T @ s), s @ smooth(X @ W[0:1].T)[:, 0], atol=1e-10)
        ones = torch.ones(len(coords), 1, dtype=torch.float64)
        assert not torch.allclose(smooth(ones), ones)  # why proj1's bias is added after smoothing


def test_exact_refuses_non_symmetric_adjacency_and_indefinite_systems():
    upper = torch.tensor([[0.0, 1.0], [0.0, 0.0]]).to_sparse_csr()
    assert not is_symmetric(upper)
    with pytest.raises(SmSolveError, match="symmetric"):
        exact_sm(torch.ones(2, 1), upper, 1.0)
    sym = torch.tensor([[0.0, 1.0], [1.0, 0.0]]).to_sparse_csr()
    with pytest.raises(SmSolveError, match="positive definite"):
        exact_sm(torch.ones(2, 1), sym, -0.75)


def test_half_precision_features_are_computed_in_float32(features):
    model = smcli_model("approx", "early", False, "trainable", "gelu", True)
    coords = BAGS["tricky"]
    adjacency = build_adjacency(grid_cells(coords, PATCH)).to_torch(torch.float32)
    half = features["tricky"].half()
    from_half = model.attention(
        half,
        adjacency,
    )
    from_float = model.attention(half.float(), adjacency)
    assert torch.equal(from_half.attention_logit, from_float.attention_logit)


@pytest.mark.parametrize("mode", ["approx", "exact"])
def test_a_non_symmetric_adjacency_is_handled_or_refused_never_silently_wrong(features, mode):
    """smcli's graphs are symmetric; a caller's own matrix is checked where the solver needs it."""
    model = smcli_model(mode, "early", False, "trainable", "gelu", True)
    n = len(BAGS["tricky"])
    generator = torch.Generator().manual_seed(3)
    dense = torch.rand(n, n, generator=generator) * (torch.rand(n, n, generator=generator) < 0.05)
    adjacency = (dense / dense.sum(1, keepdim=True).clamp_min(1)).to_sparse_csr()
    X = features["tricky"]
    if mode == "exact":
        with pytest.raises(SmSolveError, match="symmetric"):
            model.attention(X, adjacency)
        return
    result = model.attention(X, adjacency)
    bag_logit, logits = model.forward_reference(X, adjacency)
    assert (result.attention_logit - logits).abs().max() <= 1e-5
    assert abs(result.bag_logit - float(bag_logit)) <= 1e-5  # no symmetry needed outside exact


@settings(max_examples=40, deadline=None)
@given(
    offset=st.integers(0, 15),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.float64]),
    head=st.booleans(),
)
def test_scores_do_not_depend_on_where_the_features_sit_in_memory(offset, dtype, head):
    """Same values at another address (a file's data offset, an h5 read) give the same bits.

    Some CPUs (AMD EPYC, seen) give other last bits from a float32 GEMM on a buffer that is not
    16-byte aligned; smcli copies each chunk into an aligned buffer first.
    """
    rng = np.random.default_rng(7)
    coords = tricky_coords(0)
    n = len(coords)
    values = torch.from_numpy(rng.standard_normal((n, IN_DIM)).astype(np.float32)).to(dtype)
    storage = torch.zeros(n * IN_DIM + 16, dtype=dtype)
    shifted = storage[offset : offset + n * IN_DIM].view(n, IN_DIM)
    shifted.copy_(values)
    model = smcli_model("approx", "early", False, "trainable", "tanh", head)
    adj = build_adjacency(grid_cells(coords, PATCH)).to_torch(torch.float32)
    reference = model.attention(values, adj)
    moved = model.attention(shifted, adj)
    assert torch.equal(reference.attention_logit, moved.attention_logit)
    assert reference.bag_logit == moved.bag_logit
