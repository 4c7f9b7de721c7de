"""Graph options (normalize, weights, origin): parity with graphs torchmil's own datasets build."""

from __future__ import annotations

import csv
import itertools

import h5py
import numpy as np
import pytest

pytest.importorskip("torchmil")
import torch
from torchmil.datasets import CAMELYON16MILDataset, PANDAMILDataset, ProcessedMILDataset, TridentWSIDataset
from torchmil.nn import SmAttentionPool as TorchmilPool
from torchmil.utils import build_adj, normalize_adj
from typer.testing import CliRunner

import smcli
from smcli.bags import load_bag
from smcli.checkpoint import load_model
from smcli.cli import app
from smcli.errors import ModelError
from smcli.graph import (
    GraphOptions,
    build_adjacency_with,
    grid_cells_with_origin,
    neighbour_edges,
)
from smcli.scoring import score_bag

IN_DIM = 16
PATCH = 512
STEP = 448  # patches extracted with overlap: a step smaller than the patch


def jittered_coords(seed: int) -> np.ndarray:
    """Level-0 coords at step 448 with a little jitter and holes: 'min' and 'zero' grids differ."""
    rng = np.random.default_rng(seed)
    cells = np.array([(x, y) for x in range(9) for y in range(7) if rng.random() < 0.8])
    coords = cells * STEP + np.array([1_000, 333]) + rng.integers(0, 40, size=cells.shape)
    return coords.astype(np.int64)


def camelyon(root, features, coords, dataset_class=CAMELYON16MILDataset, **kwargs):
    base = root / f"patches_{PATCH}"
    for folder in ("features/features_toy", "coords", "labels", "patch_labels"):
        (base / folder).mkdir(parents=True)
    np.save(base / "features/features_toy/bag.npy", features)
    np.save(base / "coords/bag.npy", coords)
    np.save(base / "labels/bag.npy", np.array([1]))
    np.save(base / "patch_labels/bag.npy", np.zeros(len(coords)))
    with open(root / "splits.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([["bag_name", "split"], ["bag", "train"]])
    return dataset_class(
        str(root), "toy", "train", bag_keys=["X", "adj", "coords"], patch_size=PATCH, **kwargs
    )


def trident(root, features, coords, **kwargs):
    (root / "features_toy").mkdir(parents=True)
    (root / "patches").mkdir()
    with h5py.File(root / "features_toy/bag.h5", "w") as handle:
        handle["features"] = features
    with h5py.File(root / "patches/bag_patches.h5", "w") as handle:
        handle["coords"] = coords
    return TridentWSIDataset(
        str(root) + "/",
        str(root),
        "toy",
        wsi_names=["bag"],
        bag_keys=["X", "adj", "coords"],
        patch_size=PATCH,
        **kwargs,
    )


def processed(root, features, coords, **kwargs):
    (root / "features").mkdir(parents=True)
    (root / "coords").mkdir()
    np.save(root / "features/bag.npy", features)
    np.save(root / "coords/bag.npy", coords // STEP)  # grid units, as this class expects them
    return ProcessedMILDataset(
        str(root / "features"),
        coords_path=str(root / "coords"),
        bag_keys=["X", "adj", "coords"],
        **kwargs,
    )


DATASETS = {"camelyon16": camelyon, "trident": trident, "processed": processed}
GRAPH_CONFIGS = list(
    itertools.product(
        DATASETS,
        [True, False],  # norm_adj
        [False, True],  # adj_with_dist
        ["approx", "exact"],
        ["early", "mid", "late"],
    )
)


@pytest.mark.parametrize("dataset_name,norm_adj,with_dist,mode,where", GRAPH_CONFIGS)
def test_exported_graph_options_score_like_torchmil_datasets(
    tmp_path, bag_file, dataset_name, norm_adj, with_dist, mode, where
):
    rng = np.random.default_rng(7)
    coords = jittered_coords(7)
    features = rng.standard_normal((len(coords), IN_DIM)).astype(np.float32)
    dataset = DATASETS[dataset_name](
        tmp_path / "data", features, coords, norm_adj=norm_adj, adj_with_dist=with_dist
    )
    torch.manual_seed(0)
    model = TorchmilPool(IN_DIM, 6, "tanh", mode, "trainable", 10, where, True).eval()
    with torch.no_grad():
        # exact on a raw adjacency: (1 + coef) I - coef A is indefinite (not provably SPD), solved by LU
        model.sm.sm.coef.fill_(1.7)
    out = tmp_path / "m.safetensors"
    config = smcli.export_torchmil(model, out, dataset=dataset)
    assert config.graph == GraphOptions(
        norm_adj,
        "feature_distance" if with_dist else "binary",
        "min" if dataset_name == "camelyon16" else "zero",
    )

    bag = dataset[0]
    adj = bag["adj"].to(torch.float32)
    with torch.no_grad():
        _, reference = model(
            bag["X"][None], (adj.to_dense() if mode == "exact" else adj)[None], return_att=True
        )
    scored_coords = coords // STEP if dataset_name == "processed" else coords
    result = score_bag(load_model(out), load_bag(bag_file("b", torch.from_numpy(features), scored_coords)))
    delta = np.abs(result.table["attention_logit"].to_numpy() - reference[0].numpy()).max()
    # unnormalized smoothing can grow the logits into the hundreds: float32 rounding is relative
    scale = max(1.0, float(np.abs(reference[0].numpy()).max()))
    assert delta <= 1e-5 * scale


@pytest.mark.parametrize("with_dist", [False, True])
def test_exact_on_a_raw_adjacency_scores_through_the_cli_like_torchmil(tmp_path, bag_file, with_dist):
    """coef 1.7 on an unnormalized graph: (1 + coef) I - coef A is indefinite. Refused (exit 1) before
    the sparse-LU path; now `smcli score` exits 0 with torchmil's numbers."""
    coords = jittered_coords(7)
    features = np.random.default_rng(7).standard_normal((len(coords), IN_DIM)).astype(np.float32)
    dataset = trident(tmp_path / "data", features, coords, norm_adj=False, adj_with_dist=with_dist)
    torch.manual_seed(1)
    model = TorchmilPool(IN_DIM, 6, "tanh", "exact", "trainable", 10, "mid", True).eval()
    with torch.no_grad():
        model.sm.sm.coef.fill_(1.7)
    smcli.export_torchmil(model, tmp_path / "m.safetensors", dataset=dataset)
    bag = dataset[0]
    with torch.no_grad():
        _, reference = model(bag["X"][None], bag["adj"].to(torch.float32).to_dense()[None], return_att=True)
    path = bag_file("b", torch.from_numpy(features), coords)
    out = tmp_path / "scores.csv"
    arguments = ["score", str(path), "-m", str(tmp_path / "m.safetensors"), "-o", str(out)]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 0, result.stderr
    with open(out, newline="") as handle:
        logits = np.array([float(row["attention_logit"]) for row in csv.DictReader(handle)])
    expected = reference[0].numpy()
    assert np.abs(logits - expected).max() <= 1e-5 * max(1.0, float(np.abs(expected).max()))


def test_panda_dataset_grids_like_camelyon16(tmp_path, bag_file):
    coords = jittered_coords(5)
    features = np.random.default_rng(5).standard_normal((len(coords), IN_DIM)).astype(np.float32)
    dataset = camelyon(tmp_path / "data", features, coords, PANDAMILDataset, adj_with_dist=True)
    model = TorchmilPool(IN_DIM, 6, "gelu", "approx", 0.7, 10, "mid").eval()
    config = smcli.export_torchmil(model, tmp_path / "m.safetensors", dataset=dataset)
    assert (config.graph, config.patch_size, config.dist_thr) == (
        GraphOptions(True, "feature_distance", "min"),
        512,
        1.5,
    )
    bag = dataset[0]
    with torch.no_grad():
        _, reference = model(bag["X"][None], bag["adj"].to(torch.float32)[None], return_att=True)
    result = score_bag(
        load_model(tmp_path / "m.safetensors"), load_bag(bag_file("b", torch.from_numpy(features), coords))
    )
    assert np.abs(result.table["attention_logit"].to_numpy() - reference[0].numpy()).max() <= 1e-5


def test_origin_matters_for_overlapping_patches():
    """The test above would not tell 'min' from 'zero' if these coords gave the same graph."""
    coords = jittered_coords(7)
    graphs = [neighbour_edges(grid_cells_with_origin(coords, PATCH, origin)) for origin in ("min", "zero")]
    assert graphs[0].shape != graphs[1].shape or not np.array_equal(*graphs)


@pytest.mark.parametrize("normalize", [True, False])
def test_feature_distance_weights_equal_torchmil_build_adj(normalize):
    rng = np.random.default_rng(3)
    coords = jittered_coords(3) // STEP
    features = rng.standard_normal((len(coords), 300)).astype(np.float32)
    edge_index, weight = build_adj(coords, features, dist_thr=1.5)
    if normalize:
        weight = normalize_adj(edge_index, weight, n_nodes=len(coords))
    assert weight.dtype == np.float32  # torchmil's feature-distance weights are float32
    reference = dict(zip(map(tuple, edge_index.T), weight, strict=True))
    cells = grid_cells_with_origin(coords, 1.0, "zero")
    adjacency = build_adjacency_with(cells, 1.5, GraphOptions(normalize, "feature_distance"), features)
    ours = dict(zip(zip(adjacency.rows(), adjacency.col, strict=True), adjacency.weight, strict=True))
    assert ours.keys() == reference.keys()
    assert max(abs(ours[key] - float(reference[key])) for key in ours) <= 1e-6


def test_feature_distance_memory_is_chunked(monkeypatch):
    """Edges x D never materializes at once: chunks of FEATURE_DISTANCE_CHUNK_VALUES values."""
    import smcli.graph as graph

    monkeypatch.setattr(graph, "FEATURE_DISTANCE_CHUNK_VALUES", 64)
    rng = np.random.default_rng(0)
    coords = jittered_coords(1) // STEP
    features = rng.standard_normal((len(coords), 32)).astype(np.float32)
    edges = neighbour_edges(grid_cells_with_origin(coords, 1.0, "zero"), 1.5)
    chunked = graph.feature_distance_weights(edges, features)
    monkeypatch.setattr(graph, "FEATURE_DISTANCE_CHUNK_VALUES", 1 << 22)
    assert np.array_equal(chunked, graph.feature_distance_weights(edges, features))


def test_export_refuses_a_dataset_class_that_builds_coords_its_own_way(tmp_path):
    class Shifted(ProcessedMILDataset):
        def _load_coords(self, name):
            return super()._load_coords(name) // 2

    coords = jittered_coords(1)
    features = np.zeros((len(coords), IN_DIM), dtype=np.float32)
    processed(tmp_path, features, coords)
    dataset = Shifted(str(tmp_path / "features"), coords_path=str(tmp_path / "coords"), bag_keys=["X", "adj"])
    with pytest.raises(ModelError, match="dataset class Shifted defines its own _load_coords"):
        smcli.export_torchmil(TorchmilPool(IN_DIM, 4), tmp_path / "m.safetensors", dataset=dataset)


def test_export_refuses_a_patch_size_that_contradicts_the_dataset(tmp_path):
    coords = jittered_coords(1)
    dataset = trident(tmp_path, np.zeros((len(coords), IN_DIM), dtype=np.float32), coords)
    with pytest.raises(ModelError, match="patch_size=256 contradicts the dataset's patch_size 512"):
        smcli.export_torchmil(
            TorchmilPool(IN_DIM, 4), tmp_path / "m.safetensors", patch_size=256, dataset=dataset
        )
    config = smcli.export_torchmil(TorchmilPool(IN_DIM, 4), tmp_path / "m.safetensors", dataset=dataset)
    assert (config.patch_size, config.dist_thr, config.graph.origin) == (512.0, 2**0.5, "zero")


def test_inspect_grids_a_bag_with_the_model_origin(tmp_path, bag_file):
    import json

    from typer.testing import CliRunner

    from smcli.cli import app

    coords = jittered_coords(7)
    features = np.zeros((len(coords), IN_DIM), dtype=np.float32)
    dataset = trident(tmp_path / "data", features, coords)
    model = tmp_path / "m.safetensors"
    smcli.export_torchmil(TorchmilPool(IN_DIM, 4), model, dataset=dataset)
    bag = bag_file("b", torch.from_numpy(features), coords)
    shown = CliRunner().invoke(app, ["inspect", str(bag), "-m", str(model), "--json"])
    edges = {
        o: neighbour_edges(grid_cells_with_origin(coords, PATCH, o)).shape[1] // 2 for o in ("min", "zero")
    }
    assert edges["min"] != edges["zero"]
    assert json.loads(shown.stdout)[0]["n_edges"] == edges["zero"]
