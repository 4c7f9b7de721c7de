"""Sm, SmAttentionPool and the SmABMIL head, with torchmil 1.0.2's semantics and state-dict names.

Paper: "Sm: enhanced localization in Multiple Instance Learning for medical imaging
classification", NeurIPS 2024, https://arxiv.org/abs/2410.03276.

The modules here load a torchmil state dict with `load_state_dict(strict=True)`. Their
`forward_reference` follows torchmil's forward line by line (useful as a check); `attention` is the
production path. It uses that Sm is linear and acts on the instance axis while the projections
act on the feature axis, so

    Sm(X) W1^T = Sm(X W1^T)                     (early: smooth att_dim columns, not in_dim)
    w_head . (Sm(X)^T s) = s . (Sm(X) w_head) = s . Sm(X w_head)    (a scalar, transposed)

proj1's bias is added after smoothing, never smoothed: Sm of a constant is not that constant on a
normalized graph with boundaries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor

Alpha = float | str

SM_WHERE = ("early", "mid", "late", "none")
SM_MODES = ("approx", "exact")
ACTIVATIONS = {
    "tanh": torch.tanh,
    "relu": torch.relu,
    "gelu": torch.nn.functional.gelu,
}

SOLVE_RTOL = 1e-10  # bound on the relative error (energy norm) of the exact solve, in float64
SOLVE_BLOCK_COLUMNS = 32  # columns solved together: amortizes the sparse reads, stays in cache


class SmSolveError(RuntimeError):
    """The exact Sm system cannot be solved reliably (not SPD, or no convergence)."""


class _SmCoefficient(torch.nn.Module):
    """Holds torchmil's `coef`: a trainable scalar parameter, or the float 1/(1-alpha) - 1."""

    def __init__(self, alpha: Alpha) -> None:
        super().__init__()
        self.coef: torch.nn.Parameter | float
        if alpha == "trainable":
            self.coef = torch.nn.Parameter(torch.tensor(1.0))
        elif isinstance(alpha, float):
            self.coef = 1.0 / (1.0 - alpha) - 1
        else:
            raise ValueError("alpha must be a float or 'trainable'")


class Sm(torch.nn.Module):
    """The Sm operator on an unbatched signal f: (N, C) with a sparse CSR adjacency A: (N, N).

    approx: g <- (1 - a) f + a A g, `num_steps` times from g = f, with a = 1 / (1 + coef).
    exact:  solve ((1 + coef) I - coef A) g = f  (Chebyshev iteration, float64).
    """

    def __init__(self, alpha: Alpha = "trainable", num_steps: int = 10, mode: str = "approx"):
        super().__init__()
        if mode not in SM_MODES:
            raise ValueError("mode must be 'approx' or 'exact'")
        self.mode = mode
        self.num_steps = num_steps
        self.sm = _SmCoefficient(alpha)  # state-dict key: sm.coef, as torchmil's Sm.sm.coef

    @property
    def coef(self) -> float:
        coef = self.sm.coef
        return float(coef.detach()) if isinstance(coef, Tensor) else float(coef)

    def forward(self, f: Tensor, adj: Tensor, symmetric: bool = False) -> Tensor:
        """`symmetric=True` vouches that adj is symmetric (skips exact mode's check)."""
        if self.mode == "approx":
            return approx_sm(f, adj, self.coef, self.num_steps)
        return exact_sm(f, adj, self.coef, symmetric=symmetric)


def approx_sm(f: Tensor, adj: Tensor, coef: float, num_steps: int) -> Tensor:
    """num_steps of g <- (1 - a) f + a A g with a = 1 / (1 + coef), from g = f, in f's dtype.

    f: (N, C).  Two buffers are reused across steps (fresh 100 MB arrays per step cost more in
    page faults than the arithmetic).
    """
    a = 1.0 / (1.0 + coef)
    if num_steps <= 0:
        return f.clone()
    g = torch.addmm(f, adj, f, beta=1.0 - a, alpha=a)  # the first step, from g = f  (N, C)
    spare = torch.empty_like(f)
    for _ in range(num_steps - 1):
        torch.addmm(f, adj, g, beta=1.0 - a, alpha=a, out=spare)
        g, spare = spare, g
    return g


def exact_sm(
    f: Tensor, adj: Tensor, coef: float, rtol: float = SOLVE_RTOL, symmetric: bool = False
) -> Tensor:
    """Solve ((1 + coef) I - coef A) g = f for all columns of f: (N, C) at once, in float64.

    A is the symmetric normalized adjacency, so its eigenvalues lie in [-1, 1] and those of the
    system matrix M in [1, 1 + 2 coef] (coef >= 0; [1 + 2 coef, 1] for -1/2 < coef < 0): M is
    symmetric positive definite with condition number kappa <= 1 + 2|coef|. Knowing that interval,
    Chebyshev iteration converges as fast as conjugate gradient's worst case, 2 rho^k with
    rho = (sqrt(kappa) - 1) / (sqrt(kappa) + 1), without CG's inner products: each step is one
    sparse product and three in-place vector updates on reused buffers (the solve is memory-bound).
    The step count is fixed in advance from that bound, so the result is deterministic.
    """
    if not coef > -0.5:
        raise SmSolveError(
            f"exact Sm needs coef > -0.5 for a positive definite system, the model has {coef:.6g}"
        )
    if not symmetric and not is_symmetric(adj):
        raise SmSolveError("exact Sm needs a symmetric adjacency; this one is not")
    if coef == 0:
        return f.clone()
    adj64 = adj.to(torch.float64)
    low, high = sorted((1.0, 1.0 + 2.0 * coef))  # spectrum of M
    kappa = high / low
    rho = (math.sqrt(kappa) - 1) / (math.sqrt(kappa) + 1)
    steps = max(1, math.ceil(math.log(rtol / (2 * math.sqrt(kappa))) / math.log(rho)))
    out = torch.empty_like(f)
    for start in range(0, f.shape[1], SOLVE_BLOCK_COLUMNS):  # bounded float64 working set
        block = f[:, start : start + SOLVE_BLOCK_COLUMNS]
        out[:, start : start + SOLVE_BLOCK_COLUMNS] = _chebyshev(block, adj64, coef, low, high, steps)
    return out


def _chebyshev(f: Tensor, adj64: Tensor, coef: float, low: float, high: float, steps: int) -> Tensor:
    """Chebyshev iteration (Saad, Iterative Methods, alg. 12.1) for M g = f, M = (1+coef) I - coef A.

    The direction d is kept as scale * unscaled so that its update is a single in-place pass.
    """
    centre, half_width = (high + low) / 2, (high - low) / 2
    sigma = centre / half_width
    x = f.to(torch.float64) / (1.0 + coef)  # exact where A vanishes (isolated patches)
    residual = torch.mm(adj64, x).mul_(coef)  # r0 = f - M x0 = coef A x0, (N, C)
    unscaled, scale = residual.clone(), 1.0 / centre  # d0 = r0 / centre
    product = torch.empty_like(x)
    ratio = 1.0 / sigma
    for _ in range(steps):
        x.add_(unscaled, alpha=scale)
        # M d = scale * ((1 + coef) u - coef A u)
        torch.addmm(unscaled, adj64, unscaled, beta=(1.0 + coef) * scale, alpha=-coef * scale, out=product)
        residual -= product
        next_ratio = 1.0 / (2.0 * sigma - ratio)
        # d' = next_ratio ratio d + (2 next_ratio / half_width) r
        decay = next_ratio * ratio
        unscaled.add_(residual, alpha=2.0 * next_ratio / half_width / (decay * scale))
        scale *= decay
        ratio = next_ratio
    x.add_(unscaled, alpha=scale)
    return x.to(f.dtype)


def is_symmetric(adj: Tensor) -> bool:
    """True if the sparse matrix equals its transpose (indices and values), checked in O(nnz)."""
    coo = adj.to_sparse_coo().coalesce()
    transposed = coo.t().coalesce()
    return bool(
        torch.equal(coo.indices(), transposed.indices()) and torch.equal(coo.values(), transposed.values())
    )


@dataclass
class Attention:
    """Scores of one bag. attention_logit: (N,) torchmil's f; bag_logit: head output or None."""

    attention_logit: Tensor
    bag_logit: float | None


class SmAttentionPool(torch.nn.Module):
    """torchmil's SmAttentionPool, unbatched. X: (N, in_dim), adj: sparse CSR (N, N)."""

    def __init__(
        self,
        in_dim: int,
        att_dim: int = 128,
        act: str = "gelu",
        sm_mode: str = "approx",
        sm_alpha: Alpha = "trainable",
        sm_steps: int = 10,
        sm_where: str = "early",
        spectral_norm: bool = False,
    ) -> None:
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError("act must be 'tanh', 'relu' or 'gelu'")
        if sm_where not in SM_WHERE:
            raise ValueError("sm_where must be 'early', 'mid', 'late' or 'none'")
        self.sm_where = sm_where
        self.act = act
        self.act_fn = ACTIVATIONS[act]
        # torchmil: no Sm at all for zero steps, alpha 0 or sm_where 'none'
        smoothing = sm_steps > 0 and sm_alpha not in (0.0, 0) and sm_where != "none"
        self.sm: torch.nn.Module = (
            Sm(alpha=sm_alpha, num_steps=sm_steps, mode=sm_mode) if smoothing else torch.nn.Identity()
        )
        self.proj1 = torch.nn.Linear(in_dim, att_dim)
        self.proj2 = torch.nn.Linear(att_dim, 1, bias=False)
        if spectral_norm:

            def wrap(layer: torch.nn.Linear) -> torch.nn.Linear:
                # still a Linear (a parametrized subclass): .weight is W / sigma
                return cast(torch.nn.Linear, torch.nn.utils.parametrizations.spectral_norm(layer))

            if sm_where == "mid":
                self.proj2 = wrap(self.proj2)
            elif sm_where in ("early", "none"):
                self.proj1 = wrap(self.proj1)
                self.proj2 = wrap(self.proj2)
        self.eval()  # eval-mode spectral norm: sigma from the stored u, v, no power iteration

    def smooth(self, values: Tensor, adj: Tensor, symmetric: bool = False) -> Tensor:
        if isinstance(self.sm, Sm):
            return self.sm(values, adj, symmetric)
        return values

    @torch.no_grad()
    def forward_reference(self, X: Tensor, adj: Tensor) -> tuple[Tensor, Tensor]:
        """torchmil's forward, step by step. Returns z: (in_dim,) and f: (N,)."""
        if self.sm_where == "early":
            X = self.smooth(X, adj)  # (N, in_dim)
        H = self.proj1(X)  # (N, att_dim)
        if self.sm_where == "mid":
            H = self.smooth(H, adj)
        H = self.act_fn(H)
        f = self.proj2(H)  # (N, 1)
        if self.sm_where == "late":
            f = self.smooth(f, adj)
        s = torch.softmax(f, dim=0)  # (N, 1)
        z = X.T @ s  # (in_dim, 1)
        return z.squeeze(-1), f.squeeze(-1)

    @torch.no_grad()
    def attention(
        self,
        X: Tensor,
        adj: Tensor,
        head: torch.nn.Linear | None = None,
        chunk_rows: int = 16384,
        symmetric: bool | None = None,
    ) -> Attention:
        """Production path: attention logits f (N,) and, with a head, the bag logit.

        X may be float16/bfloat16: it is converted to float32 chunk by chunk, never all at once.
        symmetric: whether adj is symmetric (smcli's graphs are); None checks it when it matters.
        """
        if symmetric is None:  # only exact mode needs it (a symmetric positive definite solve)
            symmetric = not (isinstance(self.sm, Sm) and self.sm.mode == "exact") or is_symmetric(adj)
        weight1 = self.proj1.weight  # (att_dim, in_dim), spectral norm applied
        att_dim = weight1.shape[0]
        weights = weight1 if head is None else torch.cat([weight1, head.weight])
        weights = weights.to(torch.float32)
        projected = torch.empty(X.shape[0], weights.shape[0], dtype=torch.float32, device=X.device)
        # Every chunk is copied into one freshly allocated (so 64-byte aligned) buffer before the
        # GEMM: on some CPUs (seen on AMD EPYC) a float32 GEMM gives different last bits when its
        # input is not 16-byte aligned, and where the features sit depends on the file format
        # (safetensors header length, h5 reads). The copy makes the bits independent of that.
        staging = torch.empty(min(chunk_rows, X.shape[0]), X.shape[1], dtype=torch.float32, device=X.device)
        for start in range(0, X.shape[0], chunk_rows):
            chunk = X[start : start + chunk_rows]
            rows = staging[: chunk.shape[0]]
            rows.copy_(chunk)  # converts float16/bfloat16/float64 on the way
            torch.mm(rows, weights.T, out=projected[start : start + chunk_rows])  # (rows, att+1)

        if self.sm_where == "early":
            projected = self.smooth(projected, adj, symmetric)  # Sm(X) W^T = Sm(X W^T)
        hidden = projected[:, :att_dim] + self.proj1.bias  # (N, att_dim)
        if self.sm_where == "mid":
            hidden = self.smooth(hidden, adj, symmetric)
        f = torch.mm(self.act_fn(hidden), self.proj2.weight.T)  # (N, 1)
        if self.sm_where == "late":
            f = self.smooth(f, adj, symmetric)
        f = f.squeeze(-1)

        bag_logit = None
        if head is not None:
            # last_layer(z) = w . (X_used^T s) + b = s . (X_used w) + b, and for early
            # X_used w = Sm(X) w = Sm(X w): the head column was smoothed with the others
            s = torch.softmax(f, dim=0)
            bag_logit = float(s @ projected[:, att_dim] + head.bias[0])
        return Attention(attention_logit=f, bag_logit=bag_logit)


class SmABMIL(torch.nn.Module):
    """torchmil's SmABMIL without a feature extractor: `pool` plus the linear head `last_layer`."""

    def __init__(self, pool: SmAttentionPool, in_dim: int) -> None:
        super().__init__()
        self.pool = pool
        self.last_layer = torch.nn.Linear(in_dim, 1)
        self.eval()

    @torch.no_grad()
    def forward_reference(self, X: Tensor, adj: Tensor) -> tuple[Tensor, Tensor]:
        """Bag logit () and attention logits (N,), as torchmil's forward(return_att=True)."""
        z, f = self.pool.forward_reference(X, adj)
        return self.last_layer(z).squeeze(-1), f

    @torch.no_grad()
    def attention(self, X: Tensor, adj: Tensor, symmetric: bool | None = None) -> Attention:
        return self.pool.attention(X, adj, head=self.last_layer, symmetric=symmetric)
