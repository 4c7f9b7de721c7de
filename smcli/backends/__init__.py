"""Compute backends: where the model's arrays live and how the sparse product runs.

The model (smcli.model) is written once against an array namespace (the array API standard, via
array-api-compat); a backend supplies that namespace plus the few things the standard leaves out:
the sparse product (the one real hook), self-attention without an N x N matrix (the transformer's
hook), in-place updates on reused buffers, erf, and moving host arrays in and out. Adding a
backend is one new module plus one line in BACKENDS.

- cpu  (smcli.backends.cpu):  numpy + scipy.sparse CSR; never imports torch.
- torch (smcli.backends.torch_device): torch tensors on any torch device, used for CUDA (and, in
  the tests, on the CPU, so the torch code path is checked on machines without a GPU).
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol

BACKENDS = {"cpu": "smcli.backends.cpu", "torch": "smcli.backends.torch_device"}


class Backend(Protocol):
    """What the model needs beyond the array API namespace `xp`. Arrays are the backend's own."""

    name: str  # "cpu", or the torch device ("cuda:0", "cpu" for torch on the CPU)
    xp: Any  # the array API namespace (array_api_compat.numpy / array_api_compat.torch)

    def asarray(self, array: Any) -> Any:
        """A host numpy array (or a backend array) as a backend array; dtype kept, no copy if possible."""

    def empty(self, shape: tuple[int, ...], dtype: Any) -> Any:
        """An uninitialized array, 64-byte aligned (the staging buffer's bits must not depend on it)."""

    def gemm_ready(self, array: Any) -> bool:
        """Whether a float32 array can go to the GEMM as it is, its bits the same as from the
        aligned staging buffer (else the model copies it there first)."""

    def sparse(self, matrix: Any, dtype: Any) -> Any:
        """scipy.sparse CSR matrix (host) -> the backend's sparse matrix in dtype."""

    def addmm(self, base: Any, adj: Any, x: Any, beta: float, alpha: float, out: Any = None) -> Any:
        """out = beta * base + alpha * (adj @ x); base, x, out: (N, C) dense, adj: (N, N) sparse.

        out may be base itself (accumulate in place), never x.
        """

    def axpy(self, y: Any, x: Any, alpha: float) -> None:
        """y += alpha * x in place (no temporary of y's size)."""

    def gelu(self, x: Any) -> Any:
        """Exact GELU, x (1 + erf(x / sqrt 2)) / 2, elementwise; x may be overwritten."""

    def scaled_dot_product_attention(self, query: Any, key: Any, value: Any) -> Any:
        """softmax(Q K^T / sqrt(head_dim)) V per head; query, key, value: (heads, N, head_dim).

        Never materializes all heads' (N, N) scores: blocks of query rows on the CPU, torch's fused
        kernel on CUDA.
        """

    def erf(self, x: Any) -> Any:
        """The error function, elementwise, in place where the backend allows (x is consumed)."""

    def to_numpy(self, x: Any) -> Any:
        """A backend array as a host numpy array."""


def get_backend(device: str = "cpu") -> Backend:
    """'cpu' -> numpy + scipy.sparse (no torch); anything else ('cuda', 'cuda:1', 'torch:cpu') -> torch."""
    if device == "cpu":
        return importlib.import_module(BACKENDS["cpu"]).CpuBackend()
    torch_device = device.removeprefix("torch:")
    return importlib.import_module(BACKENDS["torch"]).TorchBackend(torch_device)


def backend_of(array: Any) -> Backend:
    """The backend an array belongs to: numpy arrays -> cpu, torch tensors -> torch on their device."""
    import sys

    if "torch" in sys.modules:  # an array can only be a tensor if torch was imported
        import torch

        if isinstance(array, torch.Tensor):
            return get_backend(f"torch:{array.device}")
    return get_backend("cpu")
