"""Parity with torchmil 1.0.2 (computed here) on every backend, and the identities the fast path relies on.

Backends: "cpu" (numpy + scipy.sparse, production on CPUs), "torch:cpu" (the torch backend that
runs CUDA, exercised here on the CPU) and "cuda" (skipped without a GPU).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.sparse

pytest.importorskip("torchmil")
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st
from torchmil.nn import SmAttentionPool as TorchmilPool

from smcli.checkpoint import ModelConfig, PoolConfig, build_module
from smcli.graph import GraphOptions, build_adjacency, build_adjacency_with, grid_cells
from smcli.model import SmSolveError, approx_sm, exact_sm, host_csr, is_symmetric
from tests.conftest import PATCH, tricky_coords
from tests.oracle import make_torchmil_model, torchmil_adjacency

BACKENDS = [
    "cpu",
    "torch:cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
]


AVAILABLE_BACKENDS = ["cpu", "torch:cpu"] + (["cuda"] if torch.cuda.is_available() else [])


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
    model = make_torchmil_model(IN_DIM, ATT_DIM, head, mode, where, spectral, alpha, act)
    prefix = "pool." if head else ""
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
    """Every config, on every backend available (the torchmil oracle is computed once per config)."""
    coords = BAGS[bag]
    X = features[bag]
    oracle = torchmil_model(mode, where, spectral, alpha, act, head)
    adj_sparse = torchmil_adjacency(coords, PATCH)
    # torchmil's exact mode solves a dense system; its approx mode takes the sparse matrix
    adj = adj_sparse.to_dense() if mode == "exact" else adj_sparse
    with torch.no_grad():
        out = oracle(X[None], adj[None], return_att=True)
    expected = out[1][0].numpy()
    adjacency = build_adjacency(grid_cells(coords, PATCH))
    for backend in AVAILABLE_BACKENDS:
        ours = smcli_model(mode, where, spectral, alpha, act, head).to(backend)
        ours.load_state_dict(oracle.state_dict(), strict=True)
        result = ours.attention(X.numpy(), adjacency)
        assert np.abs(as_numpy(result.attention_logit) - expected).max() <= 1e-5, backend
        reference = ours.forward_reference(X.numpy(), adjacency)
        if head:
            assert abs(result.bag_logit - float(out[0][0])) <= 1e-5, backend
            assert abs(float(reference[0]) - float(out[0][0])) <= 1e-5, backend
        else:
            assert result.bag_logit is None
            assert np.abs(as_numpy(reference[0]) - out[0][0].numpy()).max() <= 1e-5, backend  # z
        assert np.abs(as_numpy(reference[1]) - expected).max() <= 1e-5, backend


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
    sym = scipy.sparse.csr_matrix(np.array([[0.0, 1.0], [1.0, 0.0]]))  # eigenvalues -1, 1
    # 0.25 I + 0.75 A: indefinite (eigenvalues 1, -0.5), solved; 0.5 I + 0.5 A: singular, refused
    assert np.allclose(exact_sm(np.array([[1.0], [0.0]]), sym, -0.75), [[-0.5], [1.5]], atol=1e-12)
    with pytest.raises(SmSolveError, match="is singular$"):
        exact_sm(np.ones((2, 1)), sym, -0.5)


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


# ---------------------------------------------------------------------------------------------
# the exact solver on adjacencies that are not torchmil's normalized ones


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["early", "mid", "late"])
@pytest.mark.parametrize("head", [False, True])
@pytest.mark.parametrize(
    "alpha,coef",
    [
        (0.1, None),  # coef 1/9: (1 + c) - 8 c > 0, provably positive definite (Chebyshev)
        ("trainable", 0.12),  # the same, trained
        (1 / 3, None),  # coef 0.5: not provably positive definite (sparse LU)
        (0.63, None),  # coef 1.7
        ("trainable", 2.7),  # a trained coef, indefinite system
        ("trainable", -0.3),  # a negative trained coef
    ],
)
def test_exact_on_an_unnormalized_adjacency_matches_torchmils_dense_solve(
    features, backend, where, head, alpha, coef
):
    """torchmil's norm_adj=False graph (row sums up to 8): its dense float32 solve, smcli's sparse one.

    Any float32 pipeline is off by up to ~cond(M) * 6e-8 relative here (the float32 rounding of Sm's
    input is amplified by cond(M): 66 for coef 0.5, 2,400 for coef 1.7 on this bag), so the bound is
    max(1e-5, 1e-7 cond(M)) relative to the largest logit, both against torchmil's float32 forward
    and its float64 one (same weights and inputs)."""
    coords = BAGS["tricky"]
    oracle = torchmil_model("exact", where, False, alpha, "gelu", head)
    prefix = "pool." if head else ""
    if coef is not None:
        state = oracle.state_dict()
        state[f"{prefix}sm.sm.coef"] = torch.tensor(coef)
        oracle.load_state_dict(state)
    dense = torchmil_adjacency(coords, PATCH, normalize=False).to_dense()
    X = features["tricky"]
    ours = smcli_model("exact", where, False, alpha, "gelu", head).to(backend)
    ours.load_state_dict(oracle.state_dict())
    adjacency = build_adjacency_with(grid_cells(coords, PATCH), 2**0.5, GraphOptions(False, "binary"))
    result = ours.attention(X.numpy(), adjacency)
    coef_value = coef if coef is not None else 1 / (1 - alpha) - 1
    system = (1 + coef_value) * np.eye(len(coords)) - coef_value * dense.double().numpy()
    tolerance = max(1e-5, 1e-7 * np.linalg.cond(system))
    for precision in (torch.float64, torch.float32):
        with torch.no_grad():
            out = oracle.to(precision)(X[None].to(precision), dense[None].to(precision), return_att=True)
        expected = out[1][0].double().numpy()
        scale = max(1.0, float(np.abs(expected).max()))
        assert np.abs(as_numpy(result.attention_logit) - expected).max() <= tolerance * scale, precision
        if head:
            bag_logit = float(out[0][0])
            assert abs(result.bag_logit - bag_logit) <= tolerance * max(1.0, abs(bag_logit)), precision


@pytest.mark.parametrize(
    "coef,outcome",
    [
        (float("nan"), "finite"),
        (float("inf"), "finite"),
        (-float("inf"), "finite"),
        (1e12, "singular or nearly so"),
        (1e5, "ill-conditioned"),
        (-0.5, None),  # indefinite, solved by sparse LU
        (1e-17, None),
        (-1e-30, None),
        (0.0, None),
        (1000.0, None),
    ],
)
def test_extreme_coefficients_are_solved_or_refused_quickly(coef, outcome):
    coords = BAGS["tricky"]
    adjacency = build_adjacency(grid_cells(coords, PATCH))
    signal = np.random.default_rng(1).standard_normal((len(coords), 3))  # float64 in, float64 out
    if outcome is not None:
        with pytest.raises(SmSolveError, match=outcome):
            exact_sm(signal, adjacency, coef)
        return
    solution = exact_sm(signal, adjacency, coef)
    system = (1 + coef) * scipy.sparse.identity(len(coords)) - coef * adjacency.to_scipy()
    residual = np.linalg.norm(system @ solution - signal) / np.linalg.norm(signal)
    assert residual <= 1e-6
    if abs(coef) < 1e-12:
        assert np.array_equal(solution, signal)  # ~identity, exactly


@st.composite
def symmetric_systems(draw):
    """A random symmetric sparse matrix (weights of either sign, isolated rows), a coef, a signal."""
    n = draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    density = draw(st.floats(0.0, 0.5))
    scale = draw(st.sampled_from([0.1, 1.0, 3.0]))
    dense = rng.standard_normal((n, n)) * scale * (rng.random((n, n)) < density)
    if draw(st.booleans()):
        dense = np.abs(dense)
    dense = np.triu(dense, 1)
    matrix = scipy.sparse.csr_matrix(dense + dense.T)
    coef = draw(st.one_of(st.floats(-0.6, 5.0), st.sampled_from([1e-9, 50.0, 1e4, -1e-12])))
    signal = rng.standard_normal((n, draw(st.integers(1, 40))))
    return matrix, coef, signal


@settings(max_examples=300, deadline=None)
@given(system=symmetric_systems())
def test_exact_solve_is_numpys_dense_solve_or_raises(system):
    assert_dense_solve_or_refused(*system)


def assert_dense_solve_or_refused(matrix, coef, signal) -> None:
    """exact_sm either raises SmSolveError or returns numpy's dense solve, with a small residual."""
    M = (1 + coef) * np.eye(matrix.shape[0]) - coef * matrix.toarray()
    try:
        solution = exact_sm(signal, matrix, coef)
    except SmSolveError as err:
        event("refused: " + ("singular" if "singular" in str(err) else "ill-conditioned"))
        return
    event("solved")
    assert np.linalg.norm(M @ solution - signal) <= 1e-6 * np.linalg.norm(signal)
    expected = np.linalg.solve(M, signal)
    condition = np.linalg.cond(M)
    assert condition < 1e10  # what is solved is well enough conditioned for float32 scores
    # Chebyshev (provably SPD) stops at a 1e-8 relative error; LU is exact to ~cond * eps
    assert np.linalg.norm(solution - expected) <= (1e-8 + 1e-12 * condition) * np.linalg.norm(expected)


@st.composite
def raw_graphs_and_coefs(draw):
    """A random binary symmetric graph (torchmil's norm_adj=False kind: degrees 0..n-1) and a coef,
    often one that makes M = (1 + coef) I - coef A singular (1 + coef - coef lambda = 0 for an
    eigenvalue lambda of A, computed densely here) or nearly so, and a signal."""
    n = draw(st.integers(2, 30))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    upper = np.triu(rng.random((n, n)) < draw(st.floats(0.05, 0.9)), 1).astype(np.float64)
    dense = upper + upper.T
    eigenvalues = np.linalg.eigvalsh(dense)
    candidates = eigenvalues[np.abs(eigenvalues - 1) > 1e-9]
    kind = draw(st.sampled_from(["free", "singular", "nearly singular"] if len(candidates) else ["free"]))
    if kind == "free":
        coef = draw(st.floats(-3.0, 10.0))
    else:
        lam = float(candidates[draw(st.integers(0, len(candidates) - 1))])
        nudge = draw(st.sampled_from([1e-12, 1e-9, 1e-6, 1e-3])) if kind == "nearly singular" else 0.0
        coef = 1 / (lam - 1) * (1 + nudge)
    signal = rng.standard_normal((n, draw(st.integers(1, 5))))
    return scipy.sparse.csr_matrix(dense), coef, signal


@settings(max_examples=300, deadline=None)
@given(system=raw_graphs_and_coefs())
def test_exact_on_raw_graphs_is_numpys_dense_solve_or_refused(system):
    """Never a wrong number, even where M is singular or nearly so."""
    assert_dense_solve_or_refused(*system)
