"""Sm, SmAttentionPool and the SmABMIL head, with torchmil 1.0.2's semantics and state-dict names.

Paper: "Sm: enhanced localization in Multiple Instance Learning for medical imaging
classification", NeurIPS 2024, https://arxiv.org/abs/2410.03276.

The math is written once, against an array API namespace (`backend.xp`): numpy on the CPU (no
torch import), torch on CUDA; the sparse product is the backend's one hook (smcli.backends). The
parameters live on the host as numpy arrays under torchmil's state-dict names, so a torchmil
state dict loads with `load_state_dict(strict=True)`; spectral norm is applied once, in eval mode
(sigma = u . W v from the stored u, v, as torch.nn.utils.parametrizations.spectral_norm does).

`attention` is the production path. It uses that Sm is linear and acts on the instance axis while
the projections act on the feature axis, so

    Sm(X) W1^T = Sm(X W1^T)                     (early: smooth att_dim columns, not in_dim)
    w_head . (Sm(X)^T s) = s . (Sm(X) w_head) = s . Sm(X w_head)    (a scalar, transposed)

proj1's bias is added after smoothing, never smoothed: Sm of a constant is not that constant on a
normalized graph with boundaries. `forward_reference` follows torchmil's forward line by line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from smcli.backends import Backend, backend_of, get_backend
from smcli.errors import SmcliError

Alpha = float | str

SM_WHERE = ("early", "mid", "late", "none")
SM_MODES = ("approx", "exact")
ACTIVATIONS = ("tanh", "relu", "gelu")

SOLVE_RTOL = 1e-8  # relative error (energy norm) of the exact solve, divided by the condition number
SOLVE_RTOL_FLOOR = 1e-10  # ... but never asked below this (ill-conditioned systems)
SOLVE_BLOCK_COLUMNS = 32  # columns solved together: amortizes the sparse reads, stays in cache
MAX_SOLVE_STEPS = 1000  # ~ coef 2500 on a normalized graph; beyond, refuse instead of running minutes
RESIDUAL_RTOL = 1e-6  # ||M g - f|| / ||f|| accepted after the solve (float64; scores are float32)
BOUND_MARGIN = 1e-12  # relative slack on the spectral bound: rounding in the row sums
MAX_INDEFINITE_PATCHES = 250_000  # sparse LU of a 100k-patch grid: ~1 s, ~200 MB of fill; beyond, refuse
MAX_INDEFINITE_CONDITION = 1e8  # cond_1(M) * float64 eps stays below float32 rounding of the result
FLOAT32_RTOL = 1e-6  # the first float32 Chebyshev round's relative error (times 1/kappa): near its rounding
MAX_REFINEMENTS = 8  # float64 residuals per column block of the exact solve (two for torchmil's graphs)
FLOAT32_ROUND_REDUCTION = 1e-6  # what one float32 correction is asked for at most: its rounding floor


class SmSolveError(SmcliError):
    """The exact Sm system cannot be solved reliably (singular, ill-conditioned, too large, bad coef)."""


# --------------------------------------------------------------------------------------------
# the adjacency, prepared for a backend


class SmGraph:
    """A sparse adjacency (N, N) prepared for one backend.

    host: scipy.sparse CSR with the values as given (float64 for smcli's graphs). The backend's
    matrices are made per dtype on first use; symmetry and the spectral bound are computed on the
    host, once, when the exact solver asks.
    """

    def __init__(self, host: Any, backend: Backend, symmetric: bool | None = None) -> None:
        self.host = host
        self.backend = backend
        self._symmetric = symmetric
        self._matrices: dict[Any, Any] = {}
        self._bound: float | None = None

    @property
    def n(self) -> int:
        return int(self.host.shape[0])

    def matrix(self, dtype: Any) -> Any:
        if dtype not in self._matrices:
            self._matrices[dtype] = self.backend.sparse(self.host, dtype)
        return self._matrices[dtype]

    def system(self, coef: float, dtype: Any) -> Any:
        """B = coef A - (1 + coef) I = -M, the exact solver's matrix on the backend (one sparse product
        applies M with its diagonal: no separate pass over the vectors)."""
        key = ("system", coef, dtype)
        if key not in self._matrices:
            import scipy.sparse

            identity = scipy.sparse.identity(self.n, dtype=np.float64, format="csr")
            host = (coef * self.host.astype(np.float64) - (1.0 + coef) * identity).tocsr()
            host.sort_indices()
            self._matrices[key] = self.backend.sparse(host, dtype)
        return self._matrices[key]

    @property
    def symmetric(self) -> bool:
        if self._symmetric is None:
            self._symmetric = is_symmetric(self.host)
        return self._symmetric

    @property
    def spectral_bound(self) -> float:
        if self._bound is None:
            self._bound = spectral_bound(self.host)
        return self._bound


def as_graph(adj: Any, backend: Backend, symmetric: bool | None = None) -> SmGraph:
    """An SmGraph from smcli's Adjacency, a scipy.sparse matrix, or a torch sparse tensor."""
    if isinstance(adj, SmGraph):
        # the same kind of backend on the same device (numpy and torch on the CPU are both "cpu")
        if type(adj.backend) is type(backend) and adj.backend.name == backend.name:
            return adj
        adj = adj.host
    return SmGraph(host_csr(adj), backend, symmetric)


def host_csr(adj: Any):
    """scipy.sparse CSR (N, N) with sorted indices from any of the accepted adjacency types."""
    import scipy.sparse

    if hasattr(adj, "to_scipy"):  # smcli.graph.Adjacency
        return adj.to_scipy()
    if scipy.sparse.issparse(adj):
        matrix = scipy.sparse.csr_matrix(adj)
    else:  # a torch sparse (COO or CSR) tensor, e.g. from torchmil's utilities
        csr = adj.detach().cpu().to_sparse_csr()
        matrix = scipy.sparse.csr_matrix(
            (csr.values().double().numpy(), csr.col_indices().numpy(), csr.crow_indices().numpy()),
            shape=tuple(csr.shape),
        )
    matrix.sum_duplicates()
    return matrix


def is_symmetric(matrix: Any) -> bool:
    """True if the host sparse matrix equals its transpose (indices and values), in O(nnz)."""
    if matrix.shape[0] != matrix.shape[1]:
        return False
    return (matrix != matrix.T).nnz == 0


def spectral_bound(matrix: Any) -> float:
    """An upper bound on |lambda| over the eigenvalues of a sparse matrix A: (N, N).

    rho(A) <= rho(|A|) <= max_i (|A| w)_i / w_i for any positive w (Collatz-Wielandt). w = 1 is
    Gershgorin's bound, the largest absolute row sum (8 for a binary 8-neighbour grid); w =
    sqrt(entries per row) gives exactly 1 for torchmil's D^-1/2 A D^-1/2 of a binary graph, whose
    row sums can exceed 1. The smaller of the two, with a little slack for rounding.
    """
    if matrix.nnz == 0:
        return 0.0
    magnitude = abs(matrix).astype(np.float64)
    gershgorin = float(np.asarray(magnitude.sum(axis=1)).max())
    counts = np.diff(matrix.indptr).astype(np.float64)
    w = np.sqrt(np.maximum(counts, 1.0))
    weighted = float(np.max((magnitude @ w) / w))
    return min(gershgorin, weighted) * (1.0 + BOUND_MARGIN)


# --------------------------------------------------------------------------------------------
# the Sm operator


@dataclass(frozen=True)
class Sm:
    """The Sm operator on an unbatched signal f: (N, C) over an adjacency A: (N, N).

    approx: g <- (1 - a) f + a A g, `num_steps` times from g = f, with a = 1 / (1 + coef).
    exact:  solve ((1 + coef) I - coef A) g = f  in float64 (Chebyshev iteration; sparse LU where M
            is not provably positive definite).
    """

    coef: float
    num_steps: int = 10
    mode: str = "approx"

    def __call__(self, f: Any, graph: SmGraph) -> Any:
        if self.mode == "approx":
            return approx_sm(f, graph, self.coef, self.num_steps)
        return exact_sm(f, graph, self.coef)


def _graph_for(f: Any, adj: Any, symmetric: bool | None = None) -> SmGraph:
    if isinstance(adj, SmGraph):
        return adj
    return as_graph(adj, backend_of(f), symmetric)


def approx_sm(f: Any, adj: Any, coef: float, num_steps: int) -> Any:
    """num_steps of g <- (1 - a) f + a A g with a = 1 / (1 + coef), from g = f, in f's dtype.

    f: (N, C) C-contiguous.  Two buffers are reused across steps (fresh 100 MB arrays per step
    cost more in page faults than the arithmetic).
    """
    graph = _graph_for(f, adj)
    backend, xp = graph.backend, graph.backend.xp
    if num_steps <= 0:
        return xp.asarray(f, copy=True)
    a = 1.0 / (1.0 + coef)
    matrix = graph.matrix(f.dtype)
    g = backend.addmm(f, matrix, f, beta=1.0 - a, alpha=a)  # the first step, from g = f  (N, C)
    spare = xp.empty_like(g)
    for _ in range(num_steps - 1):
        backend.addmm(f, matrix, g, beta=1.0 - a, alpha=a, out=spare)
        g, spare = spare, g
    return g


def chebyshev_steps(low: float, high: float, rtol: float = SOLVE_RTOL) -> int:
    """Steps for Chebyshev iteration on a spectrum in [low, high] > 0 to reach a relative error
    (energy norm) of max(rtol / kappa, SOLVE_RTOL_FLOOR).

    The error shrinks at least as 2 rho^k with rho = (sqrt(kappa) - 1) / (sqrt(kappa) + 1). Dividing
    by kappa keeps the residual, which can be up to kappa times larger relative to f, well inside
    RESIDUAL_RTOL, and the float32 result exact to its last bits, in as few steps as that allows.
    """
    kappa = high / low
    if kappa <= 1.0 + 1e-14:  # M is a multiple of I to working precision: x0 = f / centre is exact
        return 0
    rtol = max(rtol / kappa, SOLVE_RTOL_FLOOR)
    root = math.sqrt(kappa)
    rho = (root - 1.0) / (root + 1.0)
    return max(1, math.ceil(math.log(rtol / (2.0 * root)) / math.log(rho)))


def exact_sm(f: Any, adj: Any, coef: float, rtol: float = SOLVE_RTOL, symmetric: bool | None = None) -> Any:
    """Solve ((1 + coef) I - coef A) g = f for all columns of f: (N, C) at once, in float64.

    For a symmetric A with |eigenvalues| <= r (spectral_bound: 1 for torchmil's normalized graphs,
    up to the largest degree for a binary one), the eigenvalues of M lie in
    [1 + coef - |coef| r, 1 + coef + |coef| r]. When that interval is positive, M is symmetric
    positive definite and Chebyshev iteration on it converges as fast as conjugate gradient's
    worst case, without CG's inner products: each step is one sparse product and in-place vector
    updates on reused buffers (the solve is memory-bound). The step count is fixed in advance from
    the bound, so the result is deterministic; the residual is checked at the end.
    When the interval is not positive (an unnormalized graph with coef above ~1/7, a negative coef),
    M may be indefinite but is still symmetric and, unless singular, invertible, as torchmil's dense
    solve assumes: `_indefinite_sm` solves it by sparse LU on the host.
    Raises SmSolveError when the step count would be absurd, coef is not finite, A is not symmetric,
    M is singular or too ill-conditioned, the bag is too large for the LU, or the residual is not small.
    """
    graph = _graph_for(f, adj, symmetric)
    backend, xp = graph.backend, graph.backend.xp
    if not math.isfinite(coef):
        raise SmSolveError(f"exact Sm needs a finite coef, the model has {coef}")
    if not graph.symmetric:
        raise SmSolveError("exact Sm needs a symmetric adjacency; this one is not")
    bound = graph.spectral_bound
    centre, spread = 1.0 + coef, abs(coef) * bound
    low, high = centre - spread, centre + spread
    if not low > 0:
        return _indefinite_sm(f, graph, coef)
    steps = chebyshev_steps(low, high, rtol)
    if steps > MAX_SOLVE_STEPS:
        raise SmSolveError(
            f"exact Sm with coef {coef:.6g}: the system is too ill-conditioned (condition number up to "
            f"{high / low:.3g}, {steps} solver steps); refusing rather than running for minutes"
        )
    if coef == 0 or f.shape[1] == 0:
        return xp.asarray(f, copy=True)
    if steps == 0:  # M is a multiple of I to working precision
        return f / (1.0 + coef)
    return _refined_chebyshev(backend, f, graph, coef, low, high, rtol)


def chebyshev_reduction_steps(low: float, high: float, reduction: float) -> int:
    """Chebyshev steps that shrink the residual by `reduction` on a spectrum in [low, high] > 0:
    ||r_k|| <= sqrt(kappa) ||e_k||_M / ||e_0||_M ||r_0|| <= 2 sqrt(kappa) rho^k ||r_0||."""
    kappa = high / low
    if kappa <= 1.0 + 1e-14:
        return 0
    root = math.sqrt(kappa)
    rho = (root - 1.0) / (root + 1.0)
    return max(1, math.ceil(math.log(reduction / (2.0 * root)) / math.log(rho)))


def _refined_chebyshev(
    backend: Backend, f: Any, graph: SmGraph, coef: float, low: float, high: float, rtol: float
) -> Any:
    """Mixed-precision iterative refinement: Chebyshev in float32, the residual in float64.

    f: (N, C). The solve is memory-bound: float32 halves the bytes of every pass, and the first
    round takes all columns through each sparse product together. Float32 alone stops near its
    rounding (relative residual ~kappa * 6e-8), so then, per block of SOLVE_BLOCK_COLUMNS columns
    (a bounded float64 working set), the residual r = f - M x is formed in float64 and M d = r is
    solved again in float32, x accumulating in float64, until ||r|| <= max(rtol / kappa,
    SOLVE_RTOL_FLOOR) ||f|| for the block (one correction for torchmil's graphs at coef 1: the
    float64 solution to ~1e-9, exact to float32's last bit). Deterministic: step counts come from
    the bound and the measured residuals.
    """
    xp = backend.xp
    target = max(rtol * low / high, SOLVE_RTOL_FLOOR)
    system32, system64 = graph.system(coef, xp.float32), graph.system(coef, xp.float64)
    rhs = f if f.dtype == xp.float32 else xp.astype(f, xp.float32)  # (N, C)
    first = _chebyshev(backend, rhs, system32, coef, low, high, chebyshev_steps(low, high, FLOAT32_RTOL))
    del rhs
    out = first if f.dtype == xp.float32 else xp.empty_like(f)  # written block by block, read first
    for start in range(0, f.shape[1], SOLVE_BLOCK_COLUMNS):
        cols = slice(start, start + SOLVE_BLOCK_COLUMNS)
        block = xp.astype(f[:, cols], xp.float64, copy=True)  # (N, <= 32)
        block_norm = math.sqrt(_squared_norm(xp, block))
        solution = xp.astype(first[:, cols], xp.float64, copy=True)
        for _ in range(MAX_REFINEMENTS):
            residual = backend.addmm(block, system64, solution, beta=1.0, alpha=1.0)  # f - M x = f + B x
            relative = math.sqrt(_squared_norm(xp, residual)) / block_norm if block_norm > 0 else 0.0
            if relative <= target:
                break
            steps = chebyshev_reduction_steps(low, high, max(target / relative, FLOAT32_ROUND_REDUCTION))
            residual32 = xp.astype(residual, xp.float32)
            correction = _chebyshev(backend, residual32, system32, coef, low, high, steps)
            backend.axpy(solution, xp.astype(correction, xp.float64), 1.0)
        if not relative <= RESIDUAL_RTOL:
            raise SmSolveError(
                f"exact Sm did not converge (relative residual {relative:.3g}, coef {coef:.6g})"
            )
        out[:, cols] = xp.astype(solution, f.dtype)
    return out


def _squared_norm(xp: Any, values: Any) -> float:
    return float(xp.sum(values * values))


def _indefinite_sm(f: Any, graph: SmGraph, coef: float) -> Any:
    """Solve M g = f, M = (1 + coef) I - coef A symmetric but not provably positive definite.

    f: (N, C). Sparse LU with partial pivoting (SuperLU, COLAMD ordering) of M in float64 on the
    host, the CSR graph's fill staying ~200 nonzeros per patch on a patch grid; then the columns in
    blocks of SOLVE_BLOCK_COLUMNS, each block's residual checked as on the Chebyshev path. (MINRES
    was measured and rejected: on a 100k-patch grid at coef 1.7 it had not converged after 5,000
    steps and 30 s; the LU factors it in under 1 s.) Deterministic. Refuses a singular M, one whose
    1-norm condition number (estimated from the factors) exceeds MAX_INDEFINITE_CONDITION, and bags
    over MAX_INDEFINITE_PATCHES patches.
    """
    import scipy.sparse
    import scipy.sparse.linalg

    backend, xp = graph.backend, graph.backend.xp
    if graph.n > MAX_INDEFINITE_PATCHES:
        raise SmSolveError(
            f"exact Sm with coef {coef:.6g}: (1 + coef) I - coef A is not provably positive definite and "
            f"the bag has {graph.n} patches, over the {MAX_INDEFINITE_PATCHES} the direct solver takes"
        )
    if f.shape[1] == 0:
        return xp.asarray(f, copy=True)
    identity = scipy.sparse.identity(graph.n, dtype=np.float64, format="csc")
    system = ((1.0 + coef) * identity - coef * graph.host.astype(np.float64)).tocsc()
    try:
        factors = scipy.sparse.linalg.splu(system, permc_spec="COLAMD")
    except RuntimeError:  # SuperLU: "Factor is exactly singular"
        raise SmSolveError(f"exact Sm with coef {coef:.6g}: (1 + coef) I - coef A is singular") from None
    inverse = scipy.sparse.linalg.LinearOperator(
        system.shape, matvec=factors.solve, rmatvec=lambda x: factors.solve(x, trans="T"), dtype=np.float64
    )
    condition = scipy.sparse.linalg.norm(system, 1) * scipy.sparse.linalg.onenormest(inverse, t=1)
    if not condition <= MAX_INDEFINITE_CONDITION:
        raise SmSolveError(
            f"exact Sm with coef {coef:.6g}: (1 + coef) I - coef A is singular or nearly so "
            f"(condition number about {condition:.3g}); refusing rather than returning noise"
        )
    host_backend = get_backend("cpu")  # numpy + scipy: the residual is checked where the LU ran
    host = graph if type(graph.backend) is type(host_backend) else SmGraph(graph.host, host_backend, True)
    host_matrix = host.matrix(np.float64)
    values = backend.to_numpy(f)
    out = xp.empty_like(f)
    for start in range(0, f.shape[1], SOLVE_BLOCK_COLUMNS):
        block = np.array(values[:, start : start + SOLVE_BLOCK_COLUMNS], dtype=np.float64, order="C")
        solution = np.ascontiguousarray(factors.solve(block))
        _check_residual(host.backend, block, host_matrix, coef, solution)
        out[:, start : start + SOLVE_BLOCK_COLUMNS] = xp.astype(backend.asarray(solution), f.dtype)
    return out


def _chebyshev(
    backend: Backend, f: Any, system: Any, coef: float, low: float, high: float, steps: int
) -> Any:
    """Chebyshev iteration (Saad, Iterative Methods, alg. 12.1) for M x = f, M = (1+coef) I - coef A.

    f: (N, C) C-contiguous, in the dtype of `system`, the backend's B = coef A - (1+coef) I = -M
    (graph.system: the diagonal folded into the sparse matrix, so r -= M d is one fused pass). The
    direction d is kept as scale * unscaled so that its update is a single in-place pass: per step
    one sparse product and two axpys over (N, C).
    """
    xp = backend.xp
    x = f / (1.0 + coef)  # exact where A vanishes (isolated patches)
    if steps == 0:
        return x
    centre, half_width = (high + low) / 2, (high - low) / 2
    sigma = centre / half_width
    residual = backend.addmm(f, system, x, beta=1.0, alpha=1.0)  # r0 = f - M x0 = f + B x0, (N, C)
    unscaled, scale = xp.asarray(residual, copy=True), 1.0 / centre  # d0 = r0 / centre
    ratio = 1.0 / sigma
    for _ in range(steps):
        backend.axpy(x, unscaled, scale)
        backend.addmm(residual, system, unscaled, beta=1.0, alpha=scale, out=residual)  # r -= M d
        next_ratio = 1.0 / (2.0 * sigma - ratio)
        # d' = next_ratio ratio d + (2 next_ratio / half_width) r
        decay = next_ratio * ratio
        backend.axpy(unscaled, residual, 2.0 * next_ratio / half_width / (decay * scale))
        scale *= decay
        ratio = next_ratio
    backend.axpy(x, unscaled, scale)
    return x


def _check_residual(backend: Backend, f: Any, adj64: Any, coef: float, g: Any) -> None:
    """Raise SmSolveError unless ||M g - f|| <= RESIDUAL_RTOL ||f|| (one more sparse product)."""
    xp = backend.xp
    applied = backend.addmm(g, adj64, g, beta=1.0 + coef, alpha=-coef)  # M g
    backend.axpy(applied, f, -1.0)
    residual = float(xp.sqrt(xp.sum(applied * applied)))
    scale = float(xp.sqrt(xp.sum(f * f)))
    if not residual <= RESIDUAL_RTOL * scale:
        relative = residual / scale if scale > 0 else math.inf
        raise SmSolveError(f"exact Sm did not converge (relative residual {relative:.3g}, coef {coef:.6g})")


# --------------------------------------------------------------------------------------------
# the pool and the head


@dataclass
class Attention:
    """Scores of one bag. attention_logit: (N,) torchmil's f (a backend array); bag_logit: head or None."""

    attention_logit: Any
    bag_logit: float | None


def softmax(values: Any, xp: Any) -> Any:
    """softmax over a 1-D array (N,), shifted by its maximum as torch.softmax is."""
    shifted = xp.exp(values - xp.max(values))
    return shifted / xp.sum(shifted)


def activate(hidden: Any, act: str, backend: Backend) -> Any:
    """tanh, relu or exact (erf) GELU, as torch computes them; `hidden` may be overwritten."""
    xp = backend.xp
    if act == "tanh":
        return xp.tanh(hidden)
    if act == "relu":
        return xp.clip(hidden, min=0.0)
    return backend.gelu(hidden)  # x * 0.5 * (1 + erf(x / sqrt 2)); float32 erf on the CPU (erf32)


def _linear_init(rng: np.random.Generator, out_dim: int, in_dim: int) -> np.ndarray:
    """torch.nn.Linear's default range, U(-1/sqrt(in), 1/sqrt(in)), from a numpy generator."""
    bound = 1.0 / math.sqrt(in_dim)
    return rng.uniform(-bound, bound, size=(out_dim, in_dim)).astype(np.float32)


def _bias_init(rng: np.random.Generator, out_dim: int, in_dim: int) -> np.ndarray:
    bound = 1.0 / math.sqrt(in_dim)
    return rng.uniform(-bound, bound, size=out_dim).astype(np.float32)


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    vector = rng.standard_normal(n)
    return (vector / np.linalg.norm(vector)).astype(np.float32)


def spectral_normalized(original: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Eval-mode spectral norm: W / sigma with sigma = u . (W v), from the stored u, v (float32)."""
    sigma = np.vdot(u, original @ v)
    return original / sigma


def to_numpy(value: Any) -> np.ndarray:
    """A torch tensor (without importing torch here) or array-like as a host numpy array."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        return value.numpy()
    return np.asarray(value)


class _Parameters:
    """Named host arrays with torchmil's state-dict names; a backend copy of the derived weights."""

    def __init__(self) -> None:
        self.params: dict[str, np.ndarray] = {}
        self.backend: Backend = get_backend("cpu")
        self._on_device: dict[bool, dict[str, Any]] = {}  # with head?  -> weights on the backend

    @property
    def device(self) -> str:
        return self.backend.name

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(value.shape) for name, value in self.params.items()}

    def state_dict(self) -> dict[str, np.ndarray]:
        return {name: value.copy() for name, value in self.params.items()}

    def load_state_dict(self, tensors: dict[str, Any], strict: bool = True) -> None:
        """Copy tensors (numpy or torch) in, as float32; names and shapes must match exactly."""
        missing = sorted(set(self.params) - set(tensors))
        unexpected = sorted(set(tensors) - set(self.params))
        if strict and (missing or unexpected):
            raise KeyError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
        loaded = {}
        for name in set(self.params) & set(tensors):
            value = to_numpy(tensors[name])
            if tuple(value.shape) != self.params[name].shape:
                raise ValueError(f"{name} has shape {tuple(value.shape)}, expected {self.params[name].shape}")
            loaded[name] = np.array(value, dtype=np.float32)
        self.params.update(loaded)
        self._on_device.clear()

    def to(self, device: str) -> _Parameters:
        if device != self.backend.name:
            self.backend = get_backend(device)
            self._on_device.clear()
        return self

    def eval(self) -> _Parameters:
        return self  # eval mode is the only mode: spectral norm from the stored u, v

    def weight(self, layer: str) -> np.ndarray:
        """A layer's weight as used in the forward: spectral-normalized when parametrized."""
        if f"{layer}.weight" in self.params:
            return self.params[f"{layer}.weight"]
        prefix = f"{layer}.parametrizations.weight"
        return spectral_normalized(
            self.params[f"{prefix}.original"], self.params[f"{prefix}.0._u"], self.params[f"{prefix}.0._v"]
        )


@dataclass(frozen=True)
class PoolConfig:
    """SmAttentionPool constructor arguments (torchmil 1.0.2 names and defaults)."""

    in_dim: int
    att_dim: int = 128
    act: str = "gelu"
    sm_mode: str = "approx"
    sm_alpha: Alpha = "trainable"
    sm_steps: int = 10
    sm_where: str = "early"
    spectral_norm: bool = False


class SmAttentionPool(_Parameters):
    """torchmil's SmAttentionPool, unbatched. X: (N, in_dim), adj: (N, N) sparse.

    Parameters start as torch.nn.Linear's default ranges from numpy's generator seeded with `seed`
    (and coef 1.0, torchmil's start); load a state dict to score with trained weights.
    """

    def __init__(self, config: PoolConfig, seed: int = 0) -> None:
        super().__init__()
        if config.act not in ACTIVATIONS:
            raise ValueError("act must be 'tanh', 'relu' or 'gelu'")
        if config.sm_where not in SM_WHERE:
            raise ValueError("sm_where must be 'early', 'mid', 'late' or 'none'")
        if config.sm_mode not in SM_MODES:
            raise ValueError("mode must be 'approx' or 'exact'")
        if config.sm_alpha != "trainable" and not isinstance(config.sm_alpha, float):
            raise ValueError("alpha must be a float or 'trainable'")
        self.config = config
        self.att_dim, self.act, self.sm_where = config.att_dim, config.act, config.sm_where
        rng = np.random.default_rng(seed)
        # torchmil: no Sm at all for zero steps, alpha 0 or sm_where 'none'
        self.smoothing = config.sm_steps > 0 and config.sm_alpha not in (0.0, 0) and config.sm_where != "none"
        if self.smoothing and config.sm_alpha == "trainable":
            self.params["sm.sm.coef"] = np.array(1.0, dtype=np.float32)
        # torchmil wraps proj1 and proj2 for early/none, proj2 only for mid, nothing for late
        wrapped = {"proj1": config.sm_where in ("early", "none"), "proj2": config.sm_where != "late"}
        for layer, out_dim, in_dim in (
            ("proj1", config.att_dim, config.in_dim),
            ("proj2", 1, config.att_dim),
        ):
            weight = _linear_init(rng, out_dim, in_dim)
            if config.spectral_norm and wrapped[layer]:
                prefix = f"{layer}.parametrizations.weight"
                self.params[f"{prefix}.original"] = weight
                self.params[f"{prefix}.0._u"] = _unit(rng, out_dim)
                self.params[f"{prefix}.0._v"] = _unit(rng, in_dim)
            else:
                self.params[f"{layer}.weight"] = weight
            if layer == "proj1":
                self.params["proj1.bias"] = _bias_init(rng, out_dim, in_dim)

    @property
    def sm(self) -> Sm | None:
        """The Sm operator with the current coef, or None when the model has no Sm."""
        if not self.smoothing:
            return None
        alpha = self.config.sm_alpha
        if alpha == "trainable":
            coef = float(self.params["sm.sm.coef"])
        else:
            coef = 1.0 / (1.0 - float(alpha)) - 1
        return Sm(coef, self.config.sm_steps, self.config.sm_mode)

    def _weights(self, head: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
        """The forward's weights on the backend, computed once per backend and load."""
        if (head is not None) not in self._on_device:
            proj1 = self.weight("proj1")
            stacked = proj1 if head is None else np.concatenate([proj1, head["weight"]])
            asarray = self.backend.asarray
            weights = {
                "stacked": asarray(np.ascontiguousarray(stacked)),  # (att_dim [+ 1], in_dim)
                "proj1": asarray(proj1),
                "bias": asarray(self.params["proj1.bias"]),
                "proj2": asarray(self.weight("proj2")),  # (1, att_dim)
            }
            if head is not None:
                weights["head_bias"] = float(head["bias"][0])
            self._on_device[head is not None] = weights
        return self._on_device[head is not None]

    def _smooth(self, values: Any, graph: SmGraph) -> Any:
        sm = self.sm
        return values if sm is None else sm(values, graph)

    def attention(
        self,
        X: Any,
        adj: Any,
        head: dict[str, np.ndarray] | None = None,
        chunk_rows: int = 16384,
        symmetric: bool | None = None,
    ) -> Attention:
        """Production path: attention logits f (N,) and, with a head, the bag logit.

        X: (N, in_dim) host numpy (or a backend array) in float16/float32/float64: converted to
        float32 chunk by chunk, never all at once. adj: smcli's Adjacency, scipy.sparse or torch
        sparse (N, N). symmetric: whether adj is symmetric (smcli's graphs are); None checks it
        when it matters (exact mode).
        """
        backend, xp = self.backend, self.backend.xp
        graph = as_graph(adj, backend, symmetric)
        weights = self._weights(head)
        stacked = weights["stacked"]
        n, in_dim = X.shape
        projected = backend.empty((n, stacked.shape[0]), xp.float32)  # (N, att_dim [+ 1])
        # A chunk that is not float32 at GEMM_ALIGNMENT is copied into one reused, 64-byte aligned
        # buffer before the GEMM: on some CPUs (seen on AMD EPYC with torch's GEMM) a float32 GEMM
        # gives different last bits when its input is not 16-byte aligned, and where the features
        # sit depends on the file format (safetensors header length, h5 reads). The copy makes the
        # bits independent of that; an aligned float32 chunk skips it (backend.gemm_ready).
        staging = None
        for start in range(0, n, chunk_rows):
            chunk = backend.asarray(X[start : start + chunk_rows])
            if backend.gemm_ready(chunk):
                rows = chunk
            else:
                if staging is None:
                    staging = backend.empty((min(chunk_rows, n), in_dim), xp.float32)
                rows = staging[: chunk.shape[0]]
                rows[...] = chunk  # converts float16/float64 on the way
            projected[start : start + chunk_rows] = xp.matmul(rows, stacked.T)  # (rows, att [+ 1])
        del staging

        if self.sm_where == "early":
            projected = self._smooth(projected, graph)  # Sm(X) W^T = Sm(X W^T)
        hidden = projected[:, : self.att_dim] + weights["bias"]  # (N, att_dim)
        if self.sm_where == "mid":
            hidden = self._smooth(hidden, graph)
        f = xp.matmul(activate(hidden, self.act, backend), weights["proj2"].T)  # (N, 1)
        del hidden
        if self.sm_where == "late":
            f = self._smooth(f, graph)
        f = f[:, 0]

        bag_logit = None
        if head is not None:
            # last_layer(z) = w . (X_used^T s) + b = s . (X_used w) + b, and for early
            # X_used w = Sm(X) w = Sm(X w): the head column was smoothed with the others
            s = softmax(f, xp)
            bag_logit = float(xp.sum(s * projected[:, self.att_dim])) + weights["head_bias"]
        return Attention(attention_logit=f, bag_logit=bag_logit)

    def forward_reference(self, X: Any, adj: Any) -> tuple[Any, Any]:
        """torchmil's forward, step by step (smoothing in_dim columns). Returns z: (in_dim,), f: (N,)."""
        backend, xp = self.backend, self.backend.xp
        graph = as_graph(adj, backend)
        weights = self._weights()
        features = xp.astype(backend.asarray(X), xp.float32)  # (N, in_dim)
        if self.sm_where == "early":
            features = self._smooth(features, graph)
        hidden = xp.matmul(features, weights["proj1"].T) + weights["bias"]  # (N, att_dim)
        if self.sm_where == "mid":
            hidden = self._smooth(hidden, graph)
        f = xp.matmul(activate(hidden, self.act, backend), weights["proj2"].T)  # (N, 1)
        if self.sm_where == "late":
            f = self._smooth(f, graph)
        s = softmax(f[:, 0], xp)  # (N,)
        z = xp.matmul(features.T, s)  # (in_dim,)
        return z, f[:, 0]


class SmABMIL:
    """torchmil's SmABMIL without a feature extractor: `pool` plus the linear head `last_layer`."""

    def __init__(self, pool: SmAttentionPool, in_dim: int, seed: int = 1) -> None:
        self.pool = pool
        rng = np.random.default_rng(seed)
        self.head = {"weight": _linear_init(rng, 1, in_dim), "bias": _bias_init(rng, 1, in_dim)}

    @property
    def backend(self) -> Backend:
        return self.pool.backend

    @property
    def device(self) -> str:
        return self.pool.device

    def state_dict(self) -> dict[str, np.ndarray]:
        state = {f"pool.{name}": value for name, value in self.pool.state_dict().items()}
        state.update({f"last_layer.{name}": value.copy() for name, value in self.head.items()})
        return state

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(value.shape) for name, value in self.state_dict().items()}

    def load_state_dict(self, tensors: dict[str, Any], strict: bool = True) -> None:
        expected = set(self.state_dict())
        if strict and set(tensors) != expected:
            missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
            raise KeyError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
        head = {}
        for name in ("weight", "bias"):
            value = to_numpy(tensors[f"last_layer.{name}"])
            if tuple(value.shape) != self.head[name].shape:
                raise ValueError(f"last_layer.{name} has shape {tuple(value.shape)}")
            head[name] = np.array(value, dtype=np.float32)
        pool_state = {k[len("pool.") :]: v for k, v in tensors.items() if k.startswith("pool.")}
        self.pool.load_state_dict(pool_state, strict=strict)
        self.head = head
        self.pool._on_device.clear()

    def to(self, device: str) -> SmABMIL:
        self.pool.to(device)
        return self

    def eval(self) -> SmABMIL:
        return self

    def attention(self, X: Any, adj: Any, symmetric: bool | None = None) -> Attention:
        return self.pool.attention(X, adj, head=self.head, symmetric=symmetric)

    def forward_reference(self, X: Any, adj: Any) -> tuple[float, Any]:
        """Bag logit and attention logits (N,), as torchmil's forward(return_att=True)."""
        z, f = self.pool.forward_reference(X, adj)
        head = self.pool.backend.asarray(self.head["weight"][0])
        return float(self.pool.backend.xp.sum(z * head)) + float(self.head["bias"][0]), f
