"""Read bags (features + coordinates), validate them, and work out their patch geometry.

A safetensors bag holds `features` (N, D) [or (1, N, D)] in float16/bfloat16/float32/float64 and
`coords` (N, 2), integer or float, plus optional string metadata `patch_size` and `bag_id`.
Every problem is a BagError whose message starts with the file name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from smcli.errors import BagError
from smcli.graph import infer_patch_step

FEATURE_DTYPES = ("float16", "bfloat16", "float32", "float64")
BAG_SUFFIXES = (".safetensors",)


@dataclass(frozen=True)
class BagKeys:
    """Tensor names inside a bag file."""

    features: str = "features"
    coords: str = "coords"
    labels: str = "labels"


@dataclass
class Bag:
    """One slide's bag.

    features: torch tensor (N, D) as stored (dtype preserved; the model converts per chunk).
    coords: (N, 2) numpy array as stored.  labels: (N,) 0/1 numpy array, or None.
    patch_size: step from the file's metadata, or None.
    """

    path: Path
    bag_id: str
    features: object
    coords: np.ndarray
    patch_size: float | None = None
    labels: np.ndarray | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def n_instances(self) -> int:
        return int(self.coords.shape[0])


@dataclass(frozen=True)
class Geometry:
    """The patch step used to grid the coords, and where it came from."""

    patch_step: float
    source: str  # "flag", "bag", "model", "inferred" or "default"


def _fail(path: Path, message: str) -> BagError:
    return BagError(f"{path}: {message}")


def find_bags(inputs: list[Path]) -> list[Path]:
    """Expand directories to their bag files (sorted); files are kept as given."""
    found: list[Path] = []
    for item in inputs:
        if item.is_dir():
            found.extend(sorted(p for p in item.iterdir() if p.suffix in BAG_SUFFIXES and p.is_file()))
        else:
            found.append(item)
    return found


def peek_bag_id(path: Path) -> str:
    """The bag id from the file's header alone (no tensor is read); the file stem if unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return (handle.metadata() or {}).get("bag_id") or path.stem
    except Exception:  # the real read reports what is wrong with the file
        return path.stem


def load_bag(path: str | Path, keys: BagKeys = BagKeys(), with_labels: bool = True) -> Bag:
    """Read and validate one safetensors bag."""
    path = Path(path)
    from safetensors import SafetensorError, safe_open

    if not path.exists():
        raise _fail(path, "no such file")
    if path.is_dir():
        raise _fail(path, "is a directory, not a bag file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            names = list(handle.keys())
            metadata = dict(handle.metadata() or {})
            for key in (keys.features, keys.coords):
                if key not in names:
                    raise _fail(
                        path, f"no '{key}' tensor (keys present: {', '.join(sorted(names)) or 'none'})"
                    )
            features = handle.get_tensor(keys.features)
            coords_tensor = handle.get_tensor(keys.coords)
            labels_tensor = handle.get_tensor(keys.labels) if with_labels and keys.labels in names else None
    except BagError:
        raise
    except PermissionError:
        raise _fail(path, "permission denied") from None
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as err:
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise _fail(path, f"not a safetensors bag or corrupt header ({detail[:120]})") from None

    features = _check_features(path, features, keys.features)
    coords = _check_coords(path, coords_tensor, keys.coords)
    if coords.shape[0] != features.shape[0]:
        raise _fail(
            path, f"{keys.features} has {features.shape[0]} rows but {keys.coords} has {coords.shape[0]}"
        )
    if features.shape[0] == 0:
        raise _fail(path, "empty bag (0 patches): nothing to score")
    labels = (
        None if labels_tensor is None else _check_labels(path, labels_tensor, keys.labels, coords.shape[0])
    )
    patch_size = None
    if "patch_size" in metadata:
        try:
            patch_size = float(metadata["patch_size"])
        except ValueError:
            raise _fail(path, f"metadata patch_size {metadata['patch_size']!r} is not a number") from None
        if not (math.isfinite(patch_size) and patch_size > 0):
            raise _fail(path, f"metadata patch_size {metadata['patch_size']!r} must be positive")
    bag_id = metadata.get("bag_id") or path.stem
    return Bag(path, bag_id, features, coords, patch_size, labels, metadata)


def _check_features(path: Path, features, name: str):
    import torch

    if str(features.dtype).replace("torch.", "") not in FEATURE_DTYPES:
        raise _fail(
            path,
            f"{name} has dtype {str(features.dtype).replace('torch.', '')}; "
            f"expected one of {', '.join(FEATURE_DTYPES)}",
        )
    if features.dim() == 3 and features.shape[0] == 1:
        features = features[0]
    if features.dim() != 2:
        raise _fail(path, f"{name} must be 2-D (N, D) or (1, N, D), got shape {tuple(features.shape)}")
    bad_rows = 0
    for start in range(0, features.shape[0], 16384):
        chunk = features[start : start + 16384]
        bad_rows += int((~torch.isfinite(chunk).all(dim=1)).sum())
    if bad_rows:
        raise _fail(
            path, f"{name} has non-finite values (NaN or inf) in {bad_rows} of {features.shape[0]} rows"
        )
    return features


def _check_coords(path: Path, coords, name: str) -> np.ndarray:
    import torch

    if coords.dim() == 3 and coords.shape[0] == 1:
        coords = coords[0]
    if coords.dim() != 2 or coords.shape[1] != 2:
        raise _fail(path, f"{name} must have shape (N, 2), got {tuple(coords.shape)}")
    if coords.dtype == torch.bool or coords.is_complex():
        raise _fail(
            path, f"{name} has dtype {str(coords.dtype).replace('torch.', '')}; expected integer or float"
        )
    if coords.dtype in (torch.bfloat16, torch.float16):
        coords = coords.to(torch.float32)
    array = coords.numpy()
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        bad = int((~np.isfinite(array).all(axis=1)).sum())
        raise _fail(path, f"{name} has non-finite values in {bad} rows")
    return array


def _check_labels(path: Path, labels, name: str, n: int) -> np.ndarray:
    import torch

    if labels.dtype == torch.bfloat16:
        labels = labels.to(torch.float32)
    array = labels.reshape(-1).numpy()
    if array.shape[0] != n:
        raise _fail(path, f"{name} must have one value per patch ({n}), got shape {tuple(labels.shape)}")
    if not np.isin(array, (0, 1)).all():
        raise _fail(path, f"{name} must hold 0/1 instance labels")
    return array.astype(np.int8)


def resolve_geometry(bag: Bag, flag: float | None, model_patch_size: float | None) -> Geometry:
    """Patch step precedence: --patch-size flag > bag metadata > checkpoint config > inferred."""
    if flag is not None:
        return Geometry(float(flag), "flag")
    if bag.patch_size is not None:
        return Geometry(bag.patch_size, "bag")
    if model_patch_size is not None:
        return Geometry(float(model_patch_size), "model")
    step = infer_patch_step(bag.coords)
    if step is None:  # a single patch, or all on one point: any step gives the same graph
        return Geometry(1.0, "default")
    return Geometry(step, "inferred")
