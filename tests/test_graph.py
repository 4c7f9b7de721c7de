"""smcli.graph against torchmil's build_adj + normalize_adj, and its own properties."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("torchmil")
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from smcli.graph import (
    DEFAULT_DIST_THR,
    build_adjacency,
    grid_cells,
    infer_patch_step,
    neighbour_offsets,
)
from tests.conftest import PATCH, tricky_coords
from tests.oracle import torchmil_adjacency


def as_coo(adjacency) -> torch.Tensor:
    rows = torch.from_numpy(adjacency.rows())
    cols = torch.from_numpy(adjacency.col)
    n = adjacency.n
    return torch.sparse_coo_tensor(
        torch.stack([rows, cols]), torch.from_numpy(adjacency.weight), (n, n)
    ).coalesce()


def assert_same_graph(coords, patch_size, dist_thr=DEFAULT_DIST_THR):
    expected = torchmil_adjacency(coords, patch_size, dist_thr)
    ours = as_coo(build_adjacency(grid_cells(coords, patch_size), dist_thr))
    assert torch.equal(ours.indices(), expected.indices())
    assert torch.equal(ours.values().to(torch.float32), expected.values())


def test_tricky_bag_matches_torchmil():
    assert_same_graph(tricky_coords(0), PATCH)


def test_single_instance_gets_self_loop():
    adjacency = build_adjacency(grid_cells(np.array([[5, 7]]), 1.0))
    assert adjacency.n == 1 and adjacency.col.tolist() == [0] and adjacency.weight.tolist() == [1.0]
    assert adjacency.n_edges == 0
    assert_same_graph(np.array([[5, 7]]), 1.0)


def test_isolated_patches_have_empty_rows():
    coords = np.array([[0, 0], [1, 0], [10, 10]])
    adjacency = build_adjacency(grid_cells(coords, 1.0))
    assert np.diff(adjacency.crow).tolist() == [1, 1, 0]


def test_float_coords_and_non_integral_patch_size():
    rng = np.random.default_rng(3)
    coords = rng.integers(0, 40, size=(300, 2)) * 112.5 + rng.random((300, 2)) * 50
    assert_same_graph(coords, 112.5)


@settings(max_examples=60, deadline=None)
@given(
    cells=st.lists(st.tuples(st.integers(-6, 6), st.integers(-6, 6)), min_size=1, max_size=70),
    dist_thr=st.sampled_from([0.5, 1.0, DEFAULT_DIST_THR, 1.5, 2.0, math.sqrt(5), 2.9, 3.0]),
)
def test_same_edges_and_weights_as_torchmil(cells, dist_thr):
    assert_same_graph(np.array(cells, dtype=np.int64) * 512, 512, dist_thr)


@settings(max_examples=40, deadline=None)
@given(cells=st.lists(st.tuples(st.integers(0, 15), st.integers(0, 15)), min_size=2, max_size=120))
def test_symmetric_with_rows_of_norm_at_most_one(cells):
    adjacency = build_adjacency(np.array(cells, dtype=np.int64))
    coo = as_coo(adjacency)
    transposed = coo.t().coalesce()
    assert torch.equal(coo.indices(), transposed.indices())
    assert torch.equal(coo.values(), transposed.values())
    assert adjacency.nnz == 2 * adjacency.n_edges
    assert not np.any(adjacency.col == adjacency.rows())  # no self loops beyond N = 1


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_permuting_instances_permutes_the_graph(seed):
    coords = tricky_coords(seed % 7)
    order = np.random.default_rng(seed).permutation(len(coords))
    base = as_coo(build_adjacency(grid_cells(coords, PATCH))).to_dense()
    permuted = as_coo(build_adjacency(grid_cells(coords[order], PATCH))).to_dense()
    assert torch.equal(permuted, base[order][:, order])


def test_offsets_of_the_default_threshold_are_the_8_neighbourhood_and_self():
    offsets = {tuple(o) for o in neighbour_offsets(DEFAULT_DIST_THR)}
    assert offsets == {(dx, dy) for dx in (-1, 0, 1) for dy in (-1, 0, 1)}


def test_infer_patch_step():
    assert infer_patch_step(tricky_coords(1)) == PATCH
    assert infer_patch_step(np.array([[3, 3]])) is None


def test_a_patch_step_far_too_large_is_refused_not_densified():
    from smcli.graph import MAX_MEAN_DEGREE, GraphError

    coords = np.argwhere(np.ones((60, 60))) * 512  # 3,600 patches
    with pytest.raises(GraphError, match="patch step is far too large"):
        build_adjacency(grid_cells(coords, 512 * 100))  # everything lands on one cell
    assert MAX_MEAN_DEGREE < 3_600


def test_coords_beyond_the_grid_range_are_refused():
    from smcli.graph import GraphError

    with pytest.raises(GraphError, match="exceed the grid range"):
        grid_cells(np.array([[0.0, 0.0], [1e300, 5.0]]), 1.0)


@settings(max_examples=60, deadline=None)
@given(
    cells=st.sets(st.tuples(st.integers(0, 25), st.integers(0, 25)), min_size=2, max_size=200),
    dist_thr=st.sampled_from([0.5, 1.0, DEFAULT_DIST_THR, 2.0, math.sqrt(5), 3.0]),
)
def test_raster_and_hashed_edge_lists_are_identical(cells, dist_thr):
    from smcli.graph import build_edges, raster_edges

    cells = np.array(sorted(cells), dtype=np.int64)[::-1]
    raster = raster_edges(cells, dist_thr)
    assert raster is not None  # distinct cells in a compact box take the raster path
    assert np.array_equal(raster, build_edges(cells, dist_thr))


def test_raster_path_declines_shared_cells_and_sprawling_boxes():
    from smcli.graph import raster_edges

    assert raster_edges(np.array([[0, 0], [0, 0], [1, 1]])) is None
    assert raster_edges(np.array([[0, 0], [100_000, 100_000]])) is None


def test_a_threshold_just_below_a_grid_distance_is_named():
    import math

    from smcli.graph import just_below_grid_distance

    assert just_below_grid_distance(1.414213562) == 2
    assert just_below_grid_distance(math.sqrt(5) * (1 - 5e-7)) == 5
    for fine in (math.sqrt(2), 1.5, 1.41421, 1.0, 2.0000001, math.sqrt(8) * (1 - 2e-6)):
        assert just_below_grid_distance(fine) is None, fine
