"""Coordinates -> sparse, symmetrically normalized patch adjacency.

Reproduces torchmil 1.0.2's graph (WSI dataset coordinate handling + `build_adj` + `normalize_adj`)
without a KD-tree loop and without ever forming an N x N matrix:

1. cells = trunc(coords / patch_size - min(coords / patch_size, axis=0))     (int64, >= 0)
2. edge (i, j), i != j, iff ||cell_i - cell_j||_2 <= dist_thr (binary weights; two patches on the
   same cell are neighbours at distance 0)
3. weight_ij = d_i^-1/2 * d_j^-1/2 with d the degree; isolated patches keep an empty (zero) row
4. a one-instance bag gets the 1 x 1 matrix [[1]] (torchmil adds a self loop there).

Graph options (`GraphOptions`, from the checkpoint) reproduce the other graphs torchmil's datasets
build: `origin` "zero" skips step 1's min (TridentWSIDataset), `normalize` false skips step 3
(norm_adj=False), `weights` "feature_distance" weights edges by the instance features
(adj_with_dist=True). Only numpy is used here; `Adjacency.to_scipy` makes the CSR matrix the model consumes
(`to_torch` a torch sparse CSR tensor, for callers that want one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

DEFAULT_DIST_THR = math.sqrt(2.0)  # the 8-neighbourhood on the patch grid
GRID_LIMIT = 2.0**40  # cells per axis; beyond this the step is certainly wrong (and int64 keys overflow)
RASTER_CELLS_PER_PATCH = 16  # the raster path is used while the bounding box stays this compact
MAX_MEAN_DEGREE = 256  # more neighbours than this per patch means a patch step far too large
MAX_NEIGHBOURS_PER_OFFSET = 16  # patches per neighbour cell: a step over 4x too large per axis
MAX_DIST_THR = 64.0  # patch steps; ~12,900 neighbour offsets, every one a pass over the bag
CHUNK_ENTRIES = 1 << 22  # (patches x offsets) gathered at once on the raster path: 32 MB of int64
ORIGINS = ("min", "zero")
EDGE_WEIGHTS = ("binary", "feature_distance")
FEATURE_DISTANCE_CHUNK_VALUES = 1 << 22  # edges x feature columns per chunk (16 MiB of float32)


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


GRID_DISTANCES_SQUARED = (1, 2, 4, 5, 8)  # neighbour rings: sides, diagonals, 2 steps, knight, 2 diagonals


def just_below_grid_distance(dist_thr: float, tolerance: float = 1e-6) -> int | None:
    """k when `dist_thr` (patch steps) lies within `tolerance` (relative) below √k for a grid
    distance √k: a threshold meant as √k that silently leaves that whole ring of neighbours out
    (1.414213562 drops every diagonal edge). None otherwise."""
    for k in GRID_DISTANCES_SQUARED:
        ring = math.sqrt(k)
        if ring * (1.0 - tolerance) <= dist_thr < ring and dist_thr * dist_thr < k:
            return k
    return None


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
    if not dist_thr <= MAX_DIST_THR:  # inf included: the offsets grid grows as dist_thr^2
        raise GraphError(f"dist_thr {dist_thr:g} is beyond {MAX_DIST_THR:g} patch steps")
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
    # gaps no offset bridges shrink to reach + 1: the same edges, and keys far from int64's range
    # (cells up to GRID_LIMIT apart would wrap x * width around and alias distant cells)
    cells = np.stack([_compact_axis(cells[:, 0], reach), _compact_axis(cells[:, 1], reach)], axis=1)
    width = int(cells[:, 1].max()) + 2 * reach + 1  # no key collisions across grid rows
    keys = cells[:, 0] * width + cells[:, 1]  # < (n (reach + 1))^2: no overflow below ~1e8 patches

    order = np.argsort(keys, kind="stable")  # instances grouped by cell
    unique_keys, starts, counts = np.unique(keys[order], return_index=True, return_counts=True)

    budget = neighbour_budget(n, offsets.shape[0])  # directed pairs (same-cell ones with self pairs)
    matches = []  # first count every offset's pairs (cheap: per cell), then build the edges
    for dx, dy in offsets:
        wanted = unique_keys + (dx * width + dy)
        pos = np.searchsorted(unique_keys, wanted)
        pos[pos == unique_keys.shape[0]] = 0
        hit = unique_keys[pos] == wanted
        cell_a = np.nonzero(hit)[0]
        cell_b = pos[hit]
        if cell_a.shape[0] == 0:
            continue
        budget -= int((counts[cell_a] * counts[cell_b]).sum())
        if budget < 0:  # before any pair is materialized
            raise too_dense(n, offsets.shape[0])
        matches.append((dx, dy, cell_a, cell_b))
    sources, targets = [], []
    for dx, dy, cell_a, cell_b in matches:
        count_a, count_b = counts[cell_a], counts[cell_b]
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


def _compact_axis(values: np.ndarray, reach: int) -> np.ndarray:
    """Cell coordinates on one axis -> 0, 1, ... keeping every difference up to reach + 1 exactly."""
    unique, inverse = np.unique(values, return_inverse=True)
    positions = np.zeros(unique.shape[0], dtype=np.int64)
    np.cumsum(np.minimum(np.diff(unique), reach + 1), out=positions[1:])
    return positions[inverse.reshape(-1)]


def neighbour_budget(n: int, n_offsets: int) -> int:
    """Directed neighbour pairs a bag of n patches may have: the one guard on the edge arrays' size.

    At most MAX_NEIGHBOURS_PER_OFFSET patches per neighbour cell on average (more means the patch
    step is far too large and patches pile onto shared cells), and never over MAX_MEAN_DEGREE.
    """
    return n * min(MAX_MEAN_DEGREE, MAX_NEIGHBOURS_PER_OFFSET * n_offsets)


def too_dense(n: int, n_offsets: int) -> GraphError:
    per_patch = neighbour_budget(n, n_offsets) // max(n, 1)
    return GraphError(
        f"the graph would have over {per_patch} neighbours per patch: "
        "the patch step is far too large for these coords (or --dist-thr is)"
    )


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
    per_patch = neighbour_budget(1, offsets.shape[0] + 1)  # the edge list is sized by this guard,
    found = 0  # checked as the chunks go, so a clique is refused after one chunk, not at 1000 n
    rows, cols = [], []
    chunk = max(1, CHUNK_ENTRIES // offsets.shape[0])  # patches per gather: bounded temporaries
    for start in range(0, n, chunk):
        xs, ys = x[start : start + chunk], y[start : start + chunk]
        neighbours = raster[xs[:, None] + offsets[:, 0], ys[:, None] + offsets[:, 1]]  # (chunk, n_offsets)
        neighbours.sort(axis=1)  # -1 (no neighbour) first, then ascending instance index
        present = neighbours >= 0
        found += int(np.count_nonzero(present))
        if found > per_patch * min(n, start + chunk):
            raise too_dense(n, offsets.shape[0] + 1)
        index = np.arange(start, start + xs.shape[0])[:, None]
        rows.append(np.broadcast_to(index, neighbours.shape)[present])
        cols.append(neighbours[present])
    return np.stack([np.concatenate(rows), np.concatenate(cols)])


def normalized_weights(edge_index: np.ndarray, n: int) -> np.ndarray:
    """D^-1/2 A D^-1/2 values for binary edges, in torchmil's precision (float32 degrees)."""
    row, col = edge_index
    degree = np.bincount(row, minlength=n).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv_sqrt = np.power(degree, np.float32(-0.5))
    inv_sqrt[np.isinf(inv_sqrt)] = 0
    return inv_sqrt[row].astype(np.float64) * inv_sqrt[col].astype(np.float64)


def neighbour_edges(cells: np.ndarray, dist_thr: float = DEFAULT_DIST_THR) -> np.ndarray:
    """(2, E) directed edges sorted by (row, col): the raster path when it applies, else hashing."""
    edge_index = raster_edges(cells, dist_thr)
    if edge_index is None:  # patches sharing cells, or a sparse bounding box: hash the cells
        edge_index = build_edges(cells, dist_thr)
    return edge_index


def _self_loop() -> Adjacency:
    """torchmil: a one-instance bag gets a self loop of weight 1."""
    return Adjacency(1, np.array([0, 1], dtype=np.int64), np.zeros(1, dtype=np.int64), np.ones(1))


def _csr(edge_index: np.ndarray, weight: np.ndarray, n: int) -> Adjacency:
    crow = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(edge_index[0], minlength=n), out=crow[1:])
    return Adjacency(n, crow, np.ascontiguousarray(edge_index[1]), np.asarray(weight, dtype=np.float64))


def build_adjacency(cells: np.ndarray, dist_thr: float = DEFAULT_DIST_THR) -> Adjacency:
    """Normalized sparse adjacency of a bag from its grid cells (N, 2)."""
    n = int(cells.shape[0])
    if n == 1:
        return _self_loop()
    edge_index = neighbour_edges(cells, dist_thr)
    return _csr(edge_index, normalized_weights(edge_index, n), n)


# --- graph options: the other graphs torchmil's datasets build ------------------------------------


@dataclass(frozen=True)
class GraphOptions:
    """How a checkpoint's training data built its graphs (torchmil dataset settings).

    normalize: D^-1/2 A D^-1/2 (norm_adj=True) or the raw adjacency (norm_adj=False).
    weights: "binary" or "feature_distance" (adj_with_dist=True: exp(-||x_i - x_j||_2 / D)).
    origin: "min" (CAMELYON16MILDataset, PANDAMILDataset: coords / patch_size - column min,
        truncated) or "zero" (TridentWSIDataset, ProcessedMILDataset: no min subtracted).
    """

    normalize: bool = True
    weights: str = "binary"
    origin: str = "min"

    @property
    def is_default(self) -> bool:
        return self == GraphOptions()


def grid_cells_with_origin(coords: np.ndarray, patch_size: float, origin: str = "min") -> np.ndarray:
    """Grid cells as the dataset class named by `origin` computes them. (N, 2) int64, min 0.

    "zero" truncates coords / patch_size without subtracting the column minimum first, so
    jittered or overlapping coords (a step smaller than the patch) can fall into other cells than
    under "min". The integer shift applied afterwards changes no distance, hence no edge.
    """
    if origin == "min":
        return grid_cells(coords, patch_size)
    if origin != "zero":
        raise ValueError(f"origin must be one of {', '.join(ORIGINS)}, got {origin!r}")
    scaled = np.asarray(coords, dtype=np.float64) / float(patch_size)
    if scaled.size and not np.abs(scaled).max() < GRID_LIMIT:
        raise GraphError(f"coords / patch step {patch_size:g} exceed the grid range (check the patch size)")
    cells = scaled.astype(np.int64)  # truncation toward zero, as numpy's astype(int) in torchmil
    if cells.size:
        cells -= cells.min(axis=0)
    return cells


def feature_distance_weights(edge_index: np.ndarray, features: np.ndarray) -> np.ndarray:
    """exp(-||x_i - x_j||_2 / D) for every directed edge (i, j), in float32, as torchmil's build_adj.

    edge_index: (2, E) int64, symmetric ((j, i) for every (i, j)), sorted by (row, col), as
    neighbour_edges makes it.  features: (N, D) numpy array (float32 as torchmil trains on).
    torchmil subtracts in the features' dtype, takes np.linalg.norm and divides by D in float32;
    here the squared differences are summed in float64 (torchmil's float32 dot rounds differently,
    by a few float32 ulps at most). Each undirected edge is computed once and copied to its
    reverse; chunked over edges, so memory stays O(chunk x D), not O(E x D). Returns (E,) float32.
    """
    row, col = edge_index
    dim = int(features.shape[1])
    upper = np.flatnonzero(row < col)  # one direction of every undirected edge
    # sorted by (col, row), the edge list lists the reverses of the (row, col)-sorted edges
    reverse = np.lexsort((row, col))
    out = np.empty(row.shape[0], dtype=np.float32)
    chunk = max(1, FEATURE_DISTANCE_CHUNK_VALUES // max(dim, 1))
    for start in range(0, upper.shape[0], chunk):
        edges = upper[start : start + chunk]
        # (chunk, D), rounded once as torchmil's float32 subtraction
        difference = features[row[edges]].astype(np.float32) - features[col[edges]].astype(np.float32)
        squared = np.einsum("ij,ij->i", difference, difference, dtype=np.float64)  # (chunk,)
        distance = np.sqrt(squared).astype(np.float32)
        weight = np.exp(-(distance / np.float32(dim)))
        out[edges] = weight
        out[reverse[edges]] = weight
    return out


def normalized_edge_weights(edge_index: np.ndarray, edge_weight: np.ndarray, n: int) -> np.ndarray:
    """D^-1/2 W D^-1/2 for float32 edge weights, in torchmil's precision (all in float32).

    torchmil sums the degrees in float64, casts them to float32 and multiplies
    d_i^-1/2 * w_ij * d_j^-1/2 left to right in float32.
    """
    row, col = edge_index
    degree = np.bincount(row, weights=edge_weight.astype(np.float64), minlength=n).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv_sqrt = np.power(degree, np.float32(-0.5))
    inv_sqrt[np.isinf(inv_sqrt)] = 0
    return inv_sqrt[row] * edge_weight * inv_sqrt[col]


def build_adjacency_with(
    cells: np.ndarray,
    dist_thr: float,
    options: GraphOptions,
    features: np.ndarray | None = None,
) -> Adjacency:
    """The sparse adjacency torchmil's dataset with these options builds, from grid cells (N, 2).

    features: (N, D) numpy, needed for weights "feature_distance". A one-instance bag gets the
    self loop [[1]] in every option (torchmil adds it to the normalized weights; with
    norm_adj=False its dataset cannot build that bag at all).
    """
    if options.weights not in EDGE_WEIGHTS:
        raise ValueError(f"weights must be one of {', '.join(EDGE_WEIGHTS)}, got {options.weights!r}")
    if options.weights == "binary" and options.normalize:
        return build_adjacency(cells, dist_thr)
    n = int(cells.shape[0])
    if n == 1:
        return _self_loop()
    edge_index = neighbour_edges(cells, dist_thr)
    if options.weights == "binary":  # unnormalized: the raw 0/1 matrix
        return _csr(edge_index, np.ones(edge_index.shape[1]), n)
    if features is None:
        raise ValueError("feature_distance weights need the bag's features")
    weight = feature_distance_weights(edge_index, features)
    if options.normalize:
        weight = normalized_edge_weights(edge_index, weight, n)
    return _csr(edge_index, weight, n)


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
