"""Coordinates -> sparse, symmetrically normalized patch adjacency.

Reproduces torchmil 1.0.2's graph (WSI dataset coordinate handling + `build_adj` + `normalize_adj`)
without a KD-tree loop and without ever forming an N x N matrix:

1. cells = trunc(coords / patch_size - min(coords / patch_size, axis=0))     (int64, >= 0)
2. edge (i, j), i != j, iff ||cell_i - cell_j||_2 <= dist_thr (binary weights; two patches on the
   same cell are neighbours at distance 0)
3. weight_ij = d_i^-1/2 * d_j^-1/2 with d the degree; isolated patches keep an empty (zero) row
4. a one-instance bag gets the 1 x 1 matrix [[1]] (torchmil adds a self loop there).

Only numpy is used here; `Adjacency.to_scipy` makes the CSR matrix the model consumes
(`to_torch` a torch sparse CSR tensor, for callers that want one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

DEFAULT_DIST_THR = math.sqrt(2.0)  # the 8-neighbourhood on the patch grid
GRID_LIMIT = 2.0**40  # cells per axis; beyond this the step is certainly wrong (and int64 keys overflow)
RASTER_CELLS_PER_PATCH = 16  # the raster path is used while the bounding box stays this compact
MAX_MEAN_DEGREE = 1000  # more neighbours than this per patch means a patch step far too large


class GraphError(ValueError):
    """The coordinates cannot make a sensible graph at this patch step."""


@dataclass(frozen=True)
class Adjacency:
    """Sparse normalized adjacency in CSR form, rows sorted, columns sorted within rows.

    n: number of instances.
    crow: (n + 1,) int64 row pointers.  col: (nnz,) int64.  weight: (nnz,) float64 values, computed
    as torchmil computes them (float32 degrees, products in float64).
    """

    n: int
    crow: np.ndarray
    col: np.ndarray
    weight: np.ndarray

    @property
    def nnz(self) -> int:
        return int(self.col.shape[0])

    @property
    def n_edges(self) -> int:
        """Undirected neighbour pairs (the self loop of a one-instance bag is not an edge)."""
        if self.n <= 1:
            return 0
        return self.nnz // 2

    @property
    def mean_degree(self) -> float:
        return 2.0 * self.n_edges / self.n if self.n else 0.0

    def rows(self) -> np.ndarray:
        """(nnz,) row index of every stored entry."""
        return np.repeat(np.arange(self.n, dtype=np.int64), np.diff(self.crow))

    def to_scipy(self):
        """The matrix as a scipy.sparse CSR matrix (n, n), float64 values (what the model consumes)."""
        import scipy.sparse

        return scipy.sparse.csr_matrix((self.weight, self.col, self.crow), shape=(self.n, self.n))

    def to_torch(self, dtype, device="cpu"):
        """The matrix as a torch sparse CSR tensor of shape (n, n)."""
        import warnings

        import torch

        with warnings.catch_warnings():  # "sparse CSR support is in beta": not the user's concern
            warnings.simplefilter("ignore", UserWarning)
            # int32 indices: MKL's sparse kernels would convert int64 ones on every product
            index_dtype = np.int32 if self.nnz < 2**31 - 1 else np.int64
            return torch.sparse_csr_tensor(
                torch.from_numpy(self.crow.astype(index_dtype)),
                torch.from_numpy(self.col.astype(index_dtype)),
                torch.from_numpy(self.weight).to(dtype),
                size=(self.n, self.n),
                check_invariants=False,  # built sorted and in range above
            ).to(device)


def grid_cells(coords: np.ndarray, patch_size: float) -> np.ndarray:
    """Patch-grid cell of every instance, as torchmil's WSI datasets compute it.

    coords: (N, 2) in any numeric dtype, in the units of `patch_size`.
    Returns (N, 2) int64, shifted so the smallest cell on each axis is 0.
    """
    scaled = np.asarray(coords, dtype=np.float64) / float(patch_size)
    scaled = scaled - scaled.min(axis=0)
    if scaled.size and not scaled.max() < GRID_LIMIT:
        raise GraphError(f"coords / patch step {patch_size:g} exceed the grid range (check the patch size)")
    return scaled.astype(np.int64)  # truncation, as numpy's astype(int)


def neighbour_offsets(dist_thr: float) -> np.ndarray:
    """All integer offsets (dx, dy) with dx^2 + dy^2 <= dist_thr^2, (0, 0) included.

    The comparison is the one scipy's KD-tree makes for p = 2: squared distance against
    dist_thr * dist_thr in float64 (so sqrt(2) admits the diagonal).
    """
    if not dist_thr >= 0:
        return np.zeros((0, 2), dtype=np.int64)
    reach = int(math.floor(dist_thr)) + 1
    steps = np.arange(-reach, reach + 1, dtype=np.int64)
    dx, dy = np.meshgrid(steps, steps, indexing="ij")
    squared = (dx * dx + dy * dy).astype(np.float64)
    keep = squared <= float(dist_thr) * float(dist_thr)
    return np.stack([dx[keep], dy[keep]], axis=1)


def build_edges(cells: np.ndarray, dist_thr: float = DEFAULT_DIST_THR) -> np.ndarray:
    """Directed edge list (both directions) of the neighbourhood graph, sorted by (row, col).

    cells: (N, 2) int64 grid cells.  Returns (2, E) int64; no self loops.
    Cells are hashed to one int64 key and looked up by binary search, one pass per offset.
    """
    n = cells.shape[0]
    offsets = neighbour_offsets(dist_thr)
    if n < 2 or offsets.shape[0] == 0:
        return np.zeros((2, 0), dtype=np.int64)
    reach = int(np.abs(offsets).max())
    width = int(cells[:, 1].max()) + 2 * reach + 1  # no key collisions across grid rows
    keys = cells[:, 0] * width + cells[:, 1]

    order = np.argsort(keys, kind="stable")  # instances grouped by cell
    unique_keys, starts, counts = np.unique(keys[order], return_index=True, return_counts=True)

    budget = MAX_MEAN_DEGREE * n  # directed pairs allowed (same-cell pairs counted with self pairs)
    sources, targets = [], []
    for dx, dy in offsets:
        wanted = unique_keys + (dx * width + dy)
        pos = np.searchsorted(unique_keys, wanted)
        pos[pos == unique_keys.shape[0]] = 0
        hit = unique_keys[pos] == wanted
        cell_a = np.nonzero(hit)[0]
        cell_b = pos[hit]
        if cell_a.shape[0] == 0:
            continue
        count_a, count_b = counts[cell_a], counts[cell_b]
        budget -= int((count_a * count_b).sum())
        if budget < 0:
            raise GraphError(
                f"the graph would have over {MAX_MEAN_DEGREE} neighbours per patch: "
                "the patch step is far too large for these coords"
            )
        if np.all(count_a == 1) and np.all(count_b == 1):
            i = order[starts[cell_a]]
            j = order[starts[cell_b]]
        else:  # cells holding several patches: every instance pair between the two cells
            pairs = count_a * count_b
            pair_of = np.repeat(np.arange(cell_a.shape[0]), pairs)
            k = np.arange(pair_of.shape[0]) - np.repeat(np.cumsum(pairs) - pairs, pairs)
            i = order[starts[cell_a][pair_of] + k // count_b[pair_of]]
            j = order[starts[cell_b][pair_of] + k % count_b[pair_of]]
        if dx == 0 and dy == 0:
            distinct = i != j
            i, j = i[distinct], j[distinct]
        sources.append(i)
        targets.append(j)
    if not sources:
        return np.zeros((2, 0), dtype=np.int64)
    row = np.concatenate(sources)
    col = np.concatenate(targets)
    by_row_col = np.argsort(row * n + col, kind="stable")
    return np.stack([row[by_row_col], col[by_row_col]])


def raster_edges(cells: np.ndarray, dist_thr: float = DEFAULT_DIST_THR) -> np.ndarray | None:
    """The same edges as build_edges, through a raster of the cells' bounding box (the fast path).

    Each cell's instance index is written into a (width x height) raster; a neighbour at offset
    (dx, dy) is one gather. Per row the neighbours are sorted across the few offsets, so the edge
    list comes out in (row, col) order without a global sort. Returns None when two patches share
    a cell or the raster would be much larger than the bag (build_edges handles those).
    """
    n = cells.shape[0]
    offsets = neighbour_offsets(dist_thr)
    offsets = offsets[np.any(offsets != 0, axis=1)]  # no duplicates here, so no same-cell pairs
    if offsets.shape[0] == 0:  # only same-cell pairs could be edges: build_edges handles those
        return None if duplicate_cells(cells) else np.zeros((2, 0), np.int64)
    reach = int(np.abs(offsets).max())
    width = int(cells[:, 0].max()) + 1 + 2 * reach
    height = int(cells[:, 1].max()) + 1 + 2 * reach
    if width * height > RASTER_CELLS_PER_PATCH * n + 1_000_000:
        return None
    raster = np.full((width, height), -1, dtype=np.int64)
    x, y = cells[:, 0] + reach, cells[:, 1] + reach
    raster[x, y] = np.arange(n)
    if np.count_nonzero(raster >= 0) < n:
        return None  # several patches on one cell
    neighbours = raster[x[:, None] + offsets[:, 0], y[:, None] + offsets[:, 1]]  # (N, n_offsets)
    neighbours.sort(axis=1)  # -1 (no neighbour) first, then ascending instance index
    present = neighbours >= 0
    row = np.broadcast_to(np.arange(n)[:, None], neighbours.shape)[present]
    return np.stack([row, neighbours[present]])


def normalized_weights(edge_index: np.ndarray, n: int) -> np.ndarray:
    """D^-1/2 A D^-1/2 values for binary edges, in torchmil's precision (float32 degrees)."""
    row, col = edge_index
    degree = np.bincount(row, minlength=n).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv_sqrt = np.power(degree, np.float32(-0.5))
    inv_sqrt[np.isinf(inv_sqrt)] = 0
    return inv_sqrt[row].astype(np.float64) * inv_sqrt[col].astype(np.float64)


def build_adjacency(cells: np.ndarray, dist_thr: float = DEFAULT_DIST_THR) -> Adjacency:
    """Normalized sparse adjacency of a bag from its grid cells (N, 2)."""
    n = int(cells.shape[0])
    if n == 1:  # torchmil: a one-instance bag gets a self loop of weight 1
        return Adjacency(1, np.array([0, 1], dtype=np.int64), np.zeros(1, dtype=np.int64), np.ones(1))
    edge_index = raster_edges(cells, dist_thr)
    if edge_index is None:  # patches sharing cells, or a sparse bounding box: hash the cells
        edge_index = build_edges(cells, dist_thr)
    weight = normalized_weights(edge_index, n)
    crow = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(edge_index[0], minlength=n), out=crow[1:])
    return Adjacency(n, crow, np.ascontiguousarray(edge_index[1]), weight)


def infer_patch_step(coords: np.ndarray) -> float | None:
    """Smallest positive axis-aligned step between distinct coordinate values, or None."""
    best = math.inf
    for axis in range(2):
        values = np.unique(np.asarray(coords[:, axis], dtype=np.float64))
        if values.shape[0] > 1:
            best = min(best, float(np.diff(values).min()))
    return None if math.isinf(best) else best


def duplicate_cells(cells: np.ndarray) -> int:
    """Number of instances that share their grid cell with an earlier one."""
    if cells.shape[0] == 0:
        return 0
    return int(cells.shape[0] - np.unique(cells, axis=0).shape[0])
