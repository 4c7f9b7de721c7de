"""The CPU backend: numpy arrays, scipy.sparse CSR products, scipy.special.erf. Never imports torch."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

try:  # scipy's CSR kernel that accumulates A @ X into an existing array (Y += A X): no temporary
    from scipy.sparse._sparsetools import csr_matvecs as _csr_matvecs
except ImportError:  # a future scipy without it: the public product (one temporary per step)
    _csr_matvecs = None

ALIGNMENT = 64  # bytes; a cache line, and more than any SIMD load needs
# A float32 GEMM input at this alignment gives the bits of the 64-byte aligned staging buffer. Measured
# (AMD EPYC, numpy 2.4's OpenBLAS 0.3.31, 1 and 2 threads, shapes 3..16384 x 16..1536 by 4..129):
# every 4-byte offset gave identical bits; 16 bytes is what the torch-era GEMM needed (it differed
# below), and what numpy's allocator and smcli's safetensors reads give a float32 bag.
GEMM_ALIGNMENT = 16
THREADED_MIN_VALUES = 1 << 20  # N x C below this: one thread (the hand-off would cost more)
MAX_THREADS = 8
ATTENTION_QUERY_ROWS = 256  # query rows per attention block
ATTENTION_KEY_TILE = 2048  # keys per tile: a (256, 2048) float32 block of scores is 2 MB, cache-sized


def _float32_in_place(x: Any) -> bool:
    return isinstance(x, np.ndarray) and x.dtype == np.float32 and x.flags.c_contiguous and x.flags.writeable


def thread_count() -> int:
    """Threads for the sparse product: the CPUs this process may use, capped by OMP_NUM_THREADS
    when set (the README asks processes sharing a node to set it to their share)."""
    import os

    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        available = os.cpu_count() or 1
    limit = os.environ.get("OMP_NUM_THREADS", "")
    if limit.isdigit() and int(limit) > 0:
        available = min(available, int(limit))
    return max(1, min(available, MAX_THREADS))


def array_namespace():
    """numpy itself where it implements the array API (2.1 and later), else array-api-compat's wrapper.

    Measured: importing array_api_compat.numpy costs ~45 ms per process, 7% of scoring a 2,000-patch
    bag from the shell; numpy >= 2.1 needs no wrapper for what smcli.model uses.
    """
    major, minor = (int(part) for part in np.__version__.split(".")[:2])
    if (major, minor) >= (2, 1):
        return np
    import array_api_compat.numpy

    return array_api_compat.numpy


_POOLS: dict[int, Any] = {}


def shared_pool(threads: int):
    """One thread pool per size for the whole process (backends are cheap and made often)."""
    if threads not in _POOLS:
        from concurrent.futures import ThreadPoolExecutor

        _POOLS[threads] = ThreadPoolExecutor(threads, thread_name_prefix="smcli-csr")
    return _POOLS[threads]


class RowBlocks:
    """A CSR matrix and its rows cut into contiguous blocks of about equal non-zeros, one per thread.

    scipy's CSR kernel runs on one thread but releases the GIL, and every output row depends only
    on its own row of the matrix: the blocks run on a thread pool and give the same bits as one
    call (each row is summed in the same order).
    """

    def __init__(self, matrix: Any, threads: int) -> None:
        self.matrix = matrix
        self.shape = matrix.shape
        self.dtype = matrix.dtype
        targets = np.linspace(0, matrix.nnz, threads + 1)[1:-1]
        cuts = np.unique(np.concatenate([[0], np.searchsorted(matrix.indptr, targets), [matrix.shape[0]]]))
        self.blocks = []
        for first, last in zip(cuts[:-1], cuts[1:], strict=True):
            begin, end = matrix.indptr[first], matrix.indptr[last]
            pointers = (matrix.indptr[first : last + 1] - begin).astype(matrix.indptr.dtype)
            self.blocks.append(
                (int(first), int(last), pointers, matrix.indices[begin:end], matrix.data[begin:end])
            )

    def __matmul__(self, x: np.ndarray) -> np.ndarray:
        return self.matrix @ x


class CpuBackend:
    """numpy + scipy.sparse. The sparse product runs in scipy's C++ kernel, rows split over threads."""

    name = "cpu"

    def __init__(self, threads: int | None = None) -> None:
        self.xp = array_namespace()
        self.threads = thread_count() if threads is None else threads

    def asarray(self, array: Any) -> np.ndarray:
        return np.asarray(array)

    def empty(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        dtype = np.dtype(dtype)
        size = int(np.prod(shape)) * dtype.itemsize
        raw = np.empty(size + ALIGNMENT, dtype=np.uint8)
        start = -raw.ctypes.data % ALIGNMENT
        return raw[start : start + size].view(dtype).reshape(shape)

    def gemm_ready(self, array: Any) -> bool:
        return (
            isinstance(array, np.ndarray)
            and array.dtype == np.float32
            and array.flags.c_contiguous
            and array.ctypes.data % GEMM_ALIGNMENT == 0
        )

    def sparse(self, matrix: Any, dtype: Any) -> RowBlocks:
        import scipy.sparse

        # int32 indices keep the kernel's index reads at half the bytes
        index_dtype = np.int32 if matrix.nnz < 2**31 - 1 else np.int64
        csr = scipy.sparse.csr_matrix(
            (
                matrix.data.astype(dtype),
                matrix.indices.astype(index_dtype, copy=False),
                matrix.indptr.astype(index_dtype, copy=False),
            ),
            shape=matrix.shape,
        )
        return RowBlocks(csr, self.threads)

    def addmm(self, base, adj: RowBlocks, x, beta: float, alpha: float, out=None):
        if out is None:
            out = np.empty_like(base)
        accumulate = out is base and beta == 1.0  # adding into base itself: no scaling pass
        fits = (
            _csr_matvecs is not None
            and x.flags.c_contiguous
            and out.flags.c_contiguous
            and x.dtype == out.dtype == adj.dtype
        )
        if not fits:
            if not accumulate:
                np.multiply(base, beta, out=out)
            out += alpha * (adj.matrix @ x)
            return out
        n_cols = adj.shape[1]
        columns = x.shape[1]
        flat_x = x.reshape(-1)
        scale = adj.dtype.type(alpha)

        def block(part) -> None:
            first, last, pointers, indices, data = part
            rows = out[first:last]
            if not accumulate:
                np.multiply(base[first:last], beta, out=rows)
            _csr_matvecs(
                last - first, n_cols, columns, pointers, indices, data * scale, flat_x, rows.reshape(-1)
            )

        if len(adj.blocks) == 1 or out.size < THREADED_MIN_VALUES:
            for part in adj.blocks:
                block(part)
        else:
            list(self.pool().map(block, adj.blocks))
        return out

    def pool(self):
        return shared_pool(self.threads)

    def axpy(self, y, x, alpha: float) -> None:
        from scipy.linalg.blas import get_blas_funcs

        if not (y.flags.c_contiguous and x.flags.c_contiguous and x.dtype == y.dtype):
            y += alpha * x
            return
        # BLAS axpy on the flat views updates y in place: one pass, no N x C temporary
        axpy = get_blas_funcs("axpy", (y,))
        axpy(x.reshape(-1), y.reshape(-1), a=alpha)

    def gelu(self, x):
        if _float32_in_place(x):  # numpy's float32 SIMD loops, a chunk at a time in cache
            from smcli.backends.erf32 import gelu32

            return gelu32(x)
        gate = x * (1.0 / math.sqrt(2.0))
        gate = self.erf(gate)
        gate += 1.0
        gate *= x
        gate *= 0.5
        return gate

    def scaled_dot_product_attention(self, query, key, value):
        """softmax(Q K^T / sqrt(head_dim)) V, head by head, in tiles: never an (N, N) matrix.

        query, key, value: (heads, N, head_dim) float32. For each block of ATTENTION_QUERY_ROWS
        query rows the keys are visited in tiles of ATTENTION_KEY_TILE with an online softmax (the
        running row maximum, the running sum and the output rescaled when the maximum grows, as
        FlashAttention does): the extra memory is one (rows, tile) block of scores, whatever N,
        and that block stays in cache (a block of rows against all 50,000 keys did not, and spent
        its time on memory traffic). One tile (N <= ATTENTION_KEY_TILE) is the plain softmax.
        Blocks run on the backend's threads, one (rows, tile) buffer each.
        """
        heads, n, head_dim = query.shape
        out = self.empty((heads, n, head_dim), value.dtype)
        scale = query.dtype.type(1.0 / np.sqrt(head_dim))
        rows, tile = min(ATTENTION_QUERY_ROWS, n), min(ATTENTION_KEY_TILE, n)
        keys = [np.ascontiguousarray(key[head]) for head in range(heads)]  # (N, head_dim) each
        values = [np.ascontiguousarray(value[head]) for head in range(heads)]

        def block(task: tuple[int, int]) -> None:
            head, start = task
            scores = np.empty((rows, tile), dtype=query.dtype)  # one per running block
            queries = np.ascontiguousarray(query[head, start : start + rows]) * scale  # (r, head_dim)
            count = queries.shape[0]
            running_max = np.full((count, 1), -np.inf, dtype=query.dtype)
            total = np.zeros((count, 1), dtype=query.dtype)
            accumulated = np.zeros((count, head_dim), dtype=value.dtype)
            for first in range(0, n, tile):
                part = scores[:count, : min(tile, n - first)]
                np.matmul(queries, keys[head][first : first + tile].T, out=part)  # (r, t)
                new_max = np.maximum(running_max, part.max(axis=1, keepdims=True))
                correction = np.exp(running_max - new_max)  # 0 on the first tile
                part -= new_max
                np.exp(part, out=part)
                total *= correction
                total += part.sum(axis=1, keepdims=True)
                accumulated *= correction
                accumulated += np.matmul(part, values[head][first : first + tile])
                running_max = new_max
            out[head, start : start + count] = accumulated / total

        from threadpoolctl import threadpool_limits

        tasks = [(head, start) for head in range(heads) for start in range(0, n, rows)]
        # One BLAS thread per block, the blocks on smcli's own threads: OpenBLAS's threads spin
        # while they wait, and on these (256 x 2048) products they made the attention 5x slower
        # on a busy 2-core machine (19 s against 3.5 s for N = 10,000, 4 heads of 128).
        with threadpool_limits(limits=1, user_api="blas"):
            if self.threads == 1 or len(tasks) == 1:
                for task in tasks:
                    block(task)
            else:  # numpy's ufuncs and matmul release the GIL: blocks run side by side (same bits)
                list(self.pool().map(block, tasks))
        return out

    def erf(self, x):
        if _float32_in_place(x):
            from smcli.backends.erf32 import erf32

            return erf32(x)
        from scipy.special import erf  # float64 (and anything else): exact, element by element

        return erf(x, out=x)

    def to_numpy(self, x) -> np.ndarray:
        return np.asarray(x)
