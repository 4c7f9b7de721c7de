"""The torch backend: tensors on a torch device (CUDA in production), torch sparse CSR products."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

TORCH_EXTRA = "pip install 'smcli[torch]'"  # the extra that brings torch: CUDA scoring, .pt files


def require_torch(needed_for: str):
    """The torch module, or UsageError naming the extra to install (the CPU path never needs it)."""
    from smcli.errors import UsageError

    try:
        import torch
    except ImportError:
        raise UsageError(f"{needed_for} needs PyTorch, which is not installed: {TORCH_EXTRA}") from None
    return torch


class TorchBackend:
    """torch on `device`. Imported only when a CUDA device (or, in tests, torch on the CPU) is asked for."""

    def __init__(self, device: str = "cuda") -> None:
        import array_api_compat.torch as xp
        import torch

        self.torch = torch
        self.xp = xp
        self.device = torch.device(device)
        self.name = str(self.device)

    def asarray(self, array: Any):
        torch = self.torch
        if isinstance(array, torch.Tensor):
            return array.to(self.device, non_blocking=True)
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device, non_blocking=True)

    def empty(self, shape: tuple[int, ...], dtype: Any):
        return self.torch.empty(shape, dtype=dtype, device=self.device)  # the caching allocator aligns

    def gemm_ready(self, array: Any) -> bool:
        return False  # host arrays go to the device through the staging buffer anyway

    def sparse(self, matrix: Any, dtype: Any):
        import warnings

        torch = self.torch
        index_dtype = np.int32 if matrix.nnz < 2**31 - 1 else np.int64  # MKL/cuSPARSE: no conversion
        with warnings.catch_warnings():  # "sparse CSR support is in beta": not the user's concern
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(
                torch.from_numpy(matrix.indptr.astype(index_dtype)),
                torch.from_numpy(matrix.indices.astype(index_dtype)),
                torch.from_numpy(np.ascontiguousarray(matrix.data)).to(dtype),
                size=matrix.shape,
                check_invariants=False,
            ).to(self.device)

    def addmm(self, base, adj, x, beta: float, alpha: float, out=None):
        if out is None:
            return self.torch.addmm(base, adj, x, beta=beta, alpha=alpha)
        if out is base:
            return out.addmm_(adj, x, beta=beta, alpha=alpha)
        return self.torch.addmm(base, adj, x, beta=beta, alpha=alpha, out=out)

    def axpy(self, y, x, alpha: float) -> None:
        y.add_(x, alpha=alpha)

    def gelu(self, x):
        gate = self.torch.special.erf(x * (1.0 / math.sqrt(2.0)))
        gate += 1.0
        gate *= x
        gate *= 0.5
        return gate

    def scaled_dot_product_attention(self, query, key, value):
        """torch's fused kernel (flash / memory-efficient on CUDA): no (N, N) matrix, no dropout."""
        functional = self.torch.nn.functional
        return functional.scaled_dot_product_attention(query[None], key[None], value[None])[0]

    def erf(self, x):
        return self.torch.special.erf(x)

    def to_numpy(self, x) -> np.ndarray:
        return x.detach().cpu().numpy()
