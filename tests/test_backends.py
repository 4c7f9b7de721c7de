"""The compute backends' hooks: the sparse product and in-place updates, against plain products."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse

from smcli.backends import get_backend
from smcli.backends.cpu import THREADED_MIN_VALUES, CpuBackend
from smcli.graph import build_adjacency, grid_cells
from tests.conftest import needs_torch

TORCH_CPU = pytest.param("torch:cpu", marks=needs_torch)


@pytest.fixture(scope="module")
def grid_graph():
    side = 150
    coords = np.argwhere(np.ones((side, side))) * 256
    return build_adjacency(grid_cells(coords, 256)).to_scipy()


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
def test_threaded_sparse_product_gives_the_same_bits_as_one_thread(grid_graph, threads):
    columns = THREADED_MIN_VALUES // grid_graph.shape[0] + 1  # large enough to be threaded
    rng = np.random.default_rng(0)
    x = rng.standard_normal((grid_graph.shape[0], columns)).astype(np.float32)
    base = rng.standard_normal(x.shape).astype(np.float32)
    single, threaded = CpuBackend(threads=1), CpuBackend(threads=threads)
    expected = single.addmm(base, single.sparse(grid_graph, np.float32), x, beta=0.25, alpha=0.75)
    got = threaded.addmm(base, threaded.sparse(grid_graph, np.float32), x, beta=0.25, alpha=0.75)
    assert np.array_equal(expected, got)
    reference = 0.25 * base.astype(np.float64) + 0.75 * (grid_graph @ x.astype(np.float64))
    assert np.abs(got - reference).max() <= 1e-5


@pytest.mark.parametrize("backend_name", ["cpu", TORCH_CPU])
def test_addmm_accumulates_in_place_and_axpy_updates_in_place(backend_name):
    backend = get_backend(backend_name)
    dense = np.array([[0.0, 2.0, 0.0], [2.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    matrix = backend.sparse(scipy.sparse.csr_matrix(dense), backend.xp.float64)
    x = backend.asarray(np.arange(6, dtype=np.float64).reshape(3, 2))
    out = backend.asarray(np.ones((3, 2)))
    result = backend.addmm(out, matrix, x, beta=1.0, alpha=0.5, out=out)
    expected = 1.0 + 0.5 * dense @ np.arange(6, dtype=np.float64).reshape(3, 2)
    assert np.allclose(backend.to_numpy(result), expected) and np.allclose(backend.to_numpy(out), expected)
    backend.axpy(out, x, -2.0)
    assert np.allclose(backend.to_numpy(out), expected - 2.0 * np.arange(6).reshape(3, 2))


@pytest.mark.parametrize(
    ("first", "second"),
    [
        pytest.param("cpu", "torch:cpu", marks=needs_torch),
        pytest.param("torch:cpu", "cpu", marks=needs_torch),
    ],
)
def test_a_graph_prepared_for_one_backend_serves_another_on_the_same_device(grid_graph, first, second):
    """numpy and torch on the CPU are both device "cpu": a graph made for one is rebuilt for the other."""
    from smcli.model import approx_sm, as_graph

    prepared = as_graph(grid_graph, get_backend(first))
    target = get_backend(second)
    f = np.random.default_rng(1).standard_normal((grid_graph.shape[0], 3)).astype(np.float32)
    smoothed = target.to_numpy(approx_sm(target.asarray(f), as_graph(prepared, target), 1.5, 4))
    direct = get_backend("cpu").to_numpy(approx_sm(f, as_graph(grid_graph, get_backend("cpu")), 1.5, 4))
    assert np.abs(smoothed - direct).max() <= 1e-5
