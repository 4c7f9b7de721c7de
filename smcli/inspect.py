"""What is in a file: a bag (format, tensors, geometry, the graph it would give) or a checkpoint.

Everything returns plain JSON-ready dicts; the CLI renders them. Nothing here prints.
A bag is gridded exactly as `smcli score` would grid it (same step precedence, same graph code, same
warnings), so a wrong patch step shows up here before a run is spent on it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from smcli.bags import BagKeys, is_hdf5, load_bag, resolve_geometry
from smcli.checkpoint import CONFIG_KEY, LoadedModel, ModelConfig, has_sm, load_model
from smcli.errors import BagError
from smcli.graph import DEFAULT_DIST_THR, GraphError, build_adjacency, grid_cells_with_origin
from smcli.readers import COORDS_UNITS
from smcli.tensorfile import SAFETENSORS_DTYPES, read_metadata

STEP_ORIGINS = {
    "flag": "--patch-size",
    "inferred": "smallest step between the coords",
    "default": "default (all patches on one point)",
}


def inspect_file(
    path: Path,
    model: LoadedModel | None = None,
    patch_size: float | None = None,
    dist_thr: float | None = None,
    keys: BagKeys = BagKeys(),
) -> dict[str, Any]:
    """Describe one file. Raises SmcliError (BagError/ModelError) if it is neither bag nor checkpoint."""
    path = Path(path)
    if _checkpoint_metadata(path) is not None:
        return checkpoint_info(path)
    return bag_info(path, model, patch_size, dist_thr, keys)


def _checkpoint_metadata(path: Path) -> dict[str, str] | None:
    """The safetensors metadata if the file is an smcli checkpoint, else None (no tensor read)."""
    if not path.is_file() or is_hdf5(path):
        return None
    try:
        metadata = read_metadata(path)
    except Exception:  # not safetensors: the bag reader says what it is
        return None
    return metadata if CONFIG_KEY in metadata else None


def checkpoint_info(path: Path) -> dict[str, Any]:
    """Config as stored, class, in_dim, head, parameter count and sha256 of an smcli checkpoint."""
    loaded = load_model(path)
    stored = json.loads((_checkpoint_metadata(path) or {})[CONFIG_KEY])  # load_model checked it
    return {
        "path": str(path),
        "kind": "checkpoint",
        "model": loaded.config.kind,
        "architecture": architecture(loaded.config),
        "in_dim": loaded.in_dim,
        "head": loaded.config.head,
        "n_parameters": loaded.n_parameters,
        "sha256": loaded.sha256,
        "config": stored,
        "tensors": list_tensors(path),
    }


def _sm_text(mode: str, alpha: Any, steps: int) -> str:
    alpha_text = "trainable alpha" if alpha == "trainable" else f"alpha {alpha:g}"
    return f"Sm {mode}, {alpha_text}" + (f", {steps} steps" if mode == "approx" else "")


def architecture(config: ModelConfig) -> str:
    """One line: the model's stages with their dimensions and Sm modes, in forward order."""
    pool = config.pool
    if pool.sm_where == "none" or not has_sm(pool):
        pool_sm = "no Sm"
    else:
        pool_sm = f"{_sm_text(pool.sm_mode, pool.sm_alpha, pool.sm_steps)} ({pool.sm_where})"
    stages = []
    transformer = config.transformer
    if transformer is not None:
        head_dim = transformer.att_dim // transformer.n_heads
        parts = [
            f"{transformer.n_layers} layer{'s' if transformer.n_layers != 1 else ''} x "
            f"{transformer.n_heads} heads (head_dim {head_dim})",
            f"in_dim {transformer.in_dim} -> att_dim {transformer.att_dim}",
            f"MLP {4 * transformer.att_dim}" if transformer.use_mlp else "no MLP",
            "add_self" if transformer.add_self else "no add_self",
            _sm_text(transformer.sm_mode, transformer.sm_alpha, transformer.sm_steps),
        ]
        if transformer.dropout:
            parts.append(f"dropout {transformer.dropout:g} not applied")
        stages.append("SmTransformerEncoder [" + "; ".join(parts) + "]")
    spectral = "; spectral norm" if pool.spectral_norm else ""
    stages.append(
        f"SmAttentionPool [in_dim {pool.in_dim} -> att_dim {pool.att_dim}, {pool.act}; {pool_sm}{spectral}]"
    )
    if config.head:
        stages.append(f"Linear [{pool.in_dim} -> 1]")
    return " -> ".join(stages)


def bag_info(
    path: Path,
    model: LoadedModel | None = None,
    patch_size: float | None = None,
    dist_thr: float | None = None,
    keys: BagKeys = BagKeys(),
) -> dict[str, Any]:
    """Format, tensors, coordinate units, patch step and its origin, graph size and warnings of a bag."""
    from smcli.scoring import geometry_warnings

    bag = load_bag(path, keys)
    geometry = resolve_geometry(bag, patch_size, model.config.patch_size if model is not None else None)
    if dist_thr is None:
        dist_thr = model.config.dist_thr if model is not None else DEFAULT_DIST_THR
    try:
        # the model's grid origin decides the cells (and so the edges); weights do not change them
        origin = model.config.graph.origin if model is not None else "min"
        cells = grid_cells_with_origin(bag.coords, geometry.patch_step, origin)
        adjacency = build_adjacency(cells, dist_thr)
    except GraphError as err:
        raise BagError(f"{path}: {err}") from None
    warnings = geometry_warnings(bag, geometry, cells, adjacency.n_edges)
    if model is not None and bag.features.shape[1] != model.in_dim:
        warnings.append(f"features have {bag.features.shape[1]} columns, the model expects {model.in_dim}")

    fmt = bag.metadata.get("format", "safetensors")
    units = bag.metadata.get("coords_units") or COORDS_UNITS.get(
        bag.metadata.get("source_format", fmt), "unknown"
    )
    if geometry.source == "bag":
        origin = bag.metadata.get("patch_size_source", "the bag")
    elif geometry.source == "model" and model is not None:
        origin = f"{model.path}: graph.patch_size"
    else:
        origin = STEP_ORIGINS[geometry.source]
    info: dict[str, Any] = {
        "path": str(path),
        "kind": "bag",
        "format": fmt,
        "bag_id": bag.bag_id,
        "tensors": list_tensors(path),
        "n_instances": bag.n_instances,
        "feature_dim": int(bag.features.shape[1]),
        "features_dtype": bag.features_dtype,
        "coords_dtype": str(bag.coords.dtype),
        "coords_units": units,
        "coords_min": [_number(v) for v in bag.coords.min(axis=0)],
        "coords_max": [_number(v) for v in bag.coords.max(axis=0)],
        "patch_step": geometry.patch_step,
        "patch_step_source": geometry.source,
        "patch_step_origin": origin,
        "grid": [int(cells[:, 0].max()) + 1, int(cells[:, 1].max()) + 1],
        "dist_thr": dist_thr,
        "n_edges": adjacency.n_edges,
        "mean_degree": adjacency.mean_degree,
        "isolated": int((adjacency.crow[1:] == adjacency.crow[:-1]).sum()) if bag.n_instances > 1 else 0,
        "n_labelled": None if bag.labels is None else int(bag.labels.sum()),
        "warnings": warnings,
    }
    if fmt == "safetensors":
        info["metadata"] = {k: v for k, v in bag.metadata.items() if k not in ("format", "patch_size_source")}
    else:
        info["attributes"] = h5_attributes(path)
    return info


def list_tensors(path: Path) -> list[dict[str, Any]]:
    """Name, shape and dtype of every tensor (safetensors) or dataset (HDF5), read from headers only."""
    if is_hdf5(path):
        from smcli.readers.h5 import dataset_names, import_h5py

        h5py = import_h5py(path)
        with h5py.File(path, "r") as handle:
            return [
                {"name": name, "shape": list(handle[name].shape), "dtype": str(handle[name].dtype)}
                for name in dataset_names(handle)
            ]
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as handle:
        rows = []
        for name in sorted(handle.keys()):
            piece = handle.get_slice(name)
            dtype = piece.get_dtype()
            rows.append(
                {
                    "name": name,
                    "shape": list(piece.get_shape()),
                    "dtype": SAFETENSORS_DTYPES.get(dtype, dtype),
                }
            )
        return rows


def h5_attributes(path: Path) -> dict[str, dict[str, Any]]:
    """Attributes of the file root ('/') and of every dataset that has some, JSON-ready."""
    from smcli.readers.h5 import dataset_names, import_h5py

    h5py = import_h5py(path)
    found: dict[str, dict[str, Any]] = {}
    with h5py.File(path, "r") as handle:
        for name in ["/", *dataset_names(handle)]:
            attrs = {key: _json_value(value) for key, value in handle[name].attrs.items()}
            if attrs:
                found[name] = attrs
    return found


def _number(value) -> int | float:
    value = value.item() if hasattr(value, "item") else value
    return value if isinstance(value, int) or not float(value).is_integer() else int(value)


def _json_value(value) -> Any:
    """An h5 attribute as JSON: bytes decoded, numpy scalars and arrays turned into Python."""
    import numpy as np

    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.ndarray):
        return _json_value(value.tolist())
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if isinstance(value, np.generic):
        return _json_value(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
