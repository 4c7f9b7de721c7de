"""Parity with torchmil 1.0.2 (computed here) on every backend, and the identities the fast path relies on.

Backends: "cpu" (numpy + scipy.sparse, production on CPUs), "torch:cpu" (the torch backend that
runs CUDA, exercised here on the CPU) and "cuda" (skipped without a GPU).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.sparse
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchmil.models import SmABMIL as TorchmilSmABMIL
from torchmil.nn import SmAttentionPool as TorchmilPool

from smcli.checkpoint import ModelConfig, PoolConfig, build_module
from smcli.graph import build_adjacency, grid_cells
from smcli.model import SmSolveError, approx_sm, exact_sm, host_csr, is_symmetric
from tests.conftest import PATCH, torchmil_adjacency, tricky_coords

BACKENDS = [
    "cpu",
    "torch:cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
]


def as_numpy(array) -> np.ndarray:
    """A backend array (numpy or torch on any device) as numpy."""
    return array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)


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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bag", sorted(BAGS))
@pytest.mark.parametrize("mode,where,spectral,alpha,act,head", CONFIGS)
def test_attention_logits_match_torchmil(backend, bag, features, mode, where, spectral, alpha, act, head):
    coords = BAGS[bag]
    X = features[bag]
    oracle = torchmil_model(mode, where, spectral, alpha, act, head)
    adj_sparse = torchmil_adjacency(coords, PATCH)
    # torchmil's exact mode solves a dense system; its approx mode takes the sparse matrix
    adj = adj_sparse.to_dense() if mode == "exact" else adj_sparse
    with torch.no_grad():
        out = oracle(X[None], adj[None], return_att=True)
    expected_logits = out[1][0]

    ours = smcli_model(mode, where, spectral, alpha, act, head).to(backend)
    ours.load_state_dict(oracle.state_dict(), strict=True)
    adjacency = build_adjacency(grid_cells(coords, PATCH))
    result = ours.attention(X.numpy(), adjacency)
    expected = expected_logits.numpy()
    assert np.abs(as_numpy(result.attention_logit) - expected).max() <= 1e-5
    reference = ours.forward_reference(X.numpy(), adjacency)
    if head:
        assert abs(result.bag_logit - float(out[0][0])) <= 1e-5
        assert abs(float(reference[0]) - float(out[0][0])) <= 1e-5
    else:
        assert result.bag_logit is None
        assert np.abs(as_numpy(reference[0]) - out[0][0].numpy()).max() <= 1e-5  # z, the bag vector
    assert np.abs(as_numpy(reference[1]) - expected).max() <= 1e-5


@pytest.mark.parametrize(
    "alpha,steps,where", [(0.0, 10, "early"), (0.5, 0, "mid"), ("trainable", 10, "none")]
)
def test_no_sm_configurations_are_identity(features, alpha, steps, where):
    model = build_module(ModelConfig(PoolConfig(IN_DIM, ATT_DIM, "gelu", "approx", alpha, steps, where)))
    assert model.sm is None
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
    adjacency = build_adjacency(grid_cells(coords, PATCH))
    logits = model.attention(features["tricky"].numpy(), adjacency).attention_logit
    assert np.abs(logits - expected[0].numpy()).max() <= 1e-6


def test_float_alpha_means_different_operators_in_approx_and_exact():
    """torchmil's quirk: alpha 0.9 gives coef 9. Exact smooths with weight coef/(1+coef) = 0.9 = alpha,
    approx with a = 1/(1+coef) = 0.1 = 1 - alpha: its fixed point is exact Sm with coef 1/9."""
    coords = BAGS["tricky"]
    adjacency = build_adjacency(grid_cells(coords, PATCH))
    signal = np.random.default_rng(0).standard_normal((len(coords), 3))
    coef = 1 / (1 - 0.9) - 1
    converged = approx_sm(signal, adjacency, coef, 200)
    assert np.allclose(converged, exact_sm(signal, adjacency, 1 / coef), atol=1e-9)
    assert not np.allclose(converged, exact_sm(signal, adjacency, coef), atol=1e-2)
    one_step = approx_sm(signal, adjacency, coef, 1)
    assert np.allclose(one_step, 0.9 * signal + 0.1 * (adjacency.to_scipy() @ signal))


@pytest.mark.parametrize("backend", BACKENDS)
def test_commuted_smoothing_identities(backend):
    """Sm(X) W^T = Sm(X W^T) and w.(Sm(X)^T s) = s.Sm(X w), for both modes, checked directly."""
    coords = BAGS["tricky"]
    adjacency = build_adjacency(grid_cells(coords, PATCH))
    generator = torch.Generator().manual_seed(1)
    X = torch.randn(len(coords), 16, dtype=torch.float64, generator=generator)
    W = torch.randn(5, 16, dtype=torch.float64, generator=generator)
    s = torch.softmax(torch.randn(len(coords), dtype=torch.float64, generator=generator), 0)
    if backend == "cpu":
        X, W, s = X.numpy(), W.numpy(), s.numpy()
    else:
        X, W, s = (t.to(backend.removeprefix("torch:")) for t in (X, W, s))

    def close(a, b):
        return np.allclose(as_numpy(a), as_numpy(b), atol=1e-10)

    for smooth in (lambda v: approx_sm(v, adjacency, 1.7, 10), lambda v: exact_sm(v, adjacency, 1.7)):
        assert close(smooth(X) @ W.T, smooth(X @ W.T))
        assert close(W[0] @ (smooth(X).T @ s), s @ smooth(X @ W[0:1].T)[:, 0])
        ones = np.ones((len(coords), 1))
        assert not np.allclose(smooth(ones), ones)  # why proj1's bias is added after smoothing


def test_exact_refuses_non_symmetric_adjacency_and_indefinite_systems():
    upper = scipy.sparse.csr_matrix(np.array([[0.0, 1.0], [0.0, 0.0]]))
    assert not is_symmetric(upper)
    with pytest.raises(SmSolveError, match="symmetric"):
        exact_sm(np.ones((2, 1)), upper, 1.0)
    sym = scipy.sparse.csr_matrix(np.array([[0.0, 1.0], [1.0, 0.0]]))
    with pytest.raises(SmSolveError, match="positive definite"):
        exact_sm(np.ones((2, 1)), sym, -0.75)


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_precision_features_are_computed_in_float32(features, backend):
    model = smcli_model("approx", "early", False, "trainable", "gelu", True).to(backend)
    coords = BAGS["tricky"]
    adjacency = build_adjacency(grid_cells(coords, PATCH))
    half = features["tricky"].half().numpy()
    from_half = model.attention(half, adjacency)
    from_float = model.attention(half.astype(np.float32), adjacency)
    assert np.array_equal(as_numpy(from_half.attention_logit), as_numpy(from_float.attention_logit))


def test_torch_sparse_and_scipy_adjacencies_are_accepted(features):
    """The Python API takes smcli's Adjacency, a scipy matrix or a torch sparse tensor alike."""
    model = smcli_model("approx", "mid", False, "trainable", "gelu", True)
    adjacency = build_adjacency(grid_cells(BAGS["tricky"], PATCH))
    X = features["tricky"].numpy()
    results = [
        model.attention(X, given).attention_logit
        for given in (adjacency, adjacency.to_scipy(), adjacency.to_torch(torch.float64))
    ]
    assert np.array_equal(results[0], results[1]) and np.array_equal(results[0], results[2])
    assert (host_csr(adjacency.to_torch(torch.float64)) != adjacency.to_scipy()).nnz == 0


@pytest.mark.parametrize("mode", ["approx", "exact"])
def test_a_non_symmetric_adjacency_is_handled_or_refused_never_silently_wrong(features, mode):
    """smcli's graphs are symmetric; a caller's own matrix is checked where the solver needs it."""
    model = smcli_model(mode, "early", False, "trainable", "gelu", True)
    n = len(BAGS["tricky"])
    generator = torch.Generator().manual_seed(3)
    dense = torch.rand(n, n, generator=generator) * (torch.rand(n, n, generator=generator) < 0.05)
    adjacency = scipy.sparse.csr_matrix((dense / dense.sum(1, keepdim=True).clamp_min(1)).numpy())
    X = features["tricky"].numpy()
    if mode == "exact":
        with pytest.raises(SmSolveError, match="symmetric"):
            model.attention(X, adjacency)
        return
    result = model.attention(X, adjacency)
    bag_logit, logits = model.forward_reference(X, adjacency)
    assert np.abs(result.attention_logit - logits).max() <= 1e-5
    assert abs(result.bag_logit - float(bag_logit)) <= 1e-5  # no symmetry needed outside exact


@settings(max_examples=40, deadline=None)
@given(
    offset=st.integers(0, 15),
    dtype=st.sampled_from([np.float32, np.float16, np.float64]),
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
    values = rng.standard_normal((n, IN_DIM)).astype(dtype)
    storage = np.zeros(n * IN_DIM + 16, dtype=dtype)
    shifted = storage[offset : offset + n * IN_DIM].reshape(n, IN_DIM)
    shifted[...] = values
    model = smcli_model("approx", "early", False, "trainable", "tanh", head)
    adj = build_adjacency(grid_cells(coords, PATCH))
    reference = model.attention(values, adj)
    moved = model.attention(shifted, adj)
    assert np.array_equal(reference.attention_logit, moved.attention_logit)
    assert reference.bag_logit == moved.bag_logit
