"""The CPU backend: numpy arrays, scipy.sparse CSR products, scipy.special.erf. Never imports torch."""

from __future__ import annotations

from typing import Any

import numpy as np

try:  # scipy's CSR kernel that accumulates A @ X into an existing array (Y += A X): no temporary
    from scipy.sparse._sparsetools import csr_matvecs as _csr_matvecs
except ImportError:  # a future scipy without it: the public product (one temporary per step)
    _csr_matvecs = None

ALIGNMENT = 64  # bytes; a cache line, and more than any SIMD load needs


class CpuBackend:
    """numpy + scipy.sparse. The sparse product runs in scipy's C++ kernel on one thread."""

    name = "cpu"

    def __init__(self) -> None:
        import array_api_compat.numpy as xp

        self.xp = xp

    def asarray(self, array: Any) -> np.ndarray:
        return np.asarray(array)

    def empty(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        dtype = np.dtype(dtype)
        size = int(np.prod(shape)) * dtype.itemsize
        raw = np.empty(size + ALIGNMENT, dtype=np.uint8)
        start = -raw.ctypes.data % ALIGNMENT
        return raw[start : start + size].view(dtype).reshape(shape)

    def sparse(self, matrix: Any, dtype: Any):
        import scipy.sparse

        # int32 indices keep the kernel's index reads at half the bytes
        index_dtype = np.int32 if matrix.nnz < 2**31 - 1 else np.int64
        return scipy.sparse.csr_matrix(
            (
                matrix.data.astype(dtype),
                matrix.indices.astype(index_dtype, copy=False),
                matrix.indptr.astype(index_dtype, copy=False),
            ),
            shape=matrix.shape,
        )

    def addmm(self, base, adj, x, beta: float, alpha: float, out=None):
        if out is None:
            out = np.empty_like(base)
        np.multiply(base, beta, out=out)
        fits = (
            _csr_matvecs is not None
            and x.flags.c_contiguous
            and out.flags.c_contiguous
            and x.dtype == out.dtype == adj.dtype
        )
        if fits:
            n_rows, n_cols = adj.shape
            scaled = adj.data * adj.data.dtype.type(alpha)  # nnz values, far fewer than N x C
            _csr_matvecs(n_rows, n_cols, x.shape[1], adj.indptr, adj.indices, scaled, x.ravel(), out.ravel())
        else:
            out += alpha * (adj @ x)
        return out

    def axpy(self, y, x, alpha: float) -> None:
        from scipy.linalg.blas import get_blas_funcs

        if not (y.flags.c_contiguous and x.flags.c_contiguous and x.dtype == y.dtype):
            y += alpha * x
            return
        # BLAS axpy on the flat views updates y in place: one pass, no N x C temporary
        axpy = get_blas_funcs("axpy", (y,))
        axpy(x.reshape(-1), y.reshape(-1), a=alpha)

    def erf(self, x):
        from scipy.special import erf

        return erf(x, out=x)

    def to_numpy(self, x) -> np.ndarray:
        return np.asarray(x)
