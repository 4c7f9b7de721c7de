"""Read bags (features + coordinates), validate them, and work out their patch geometry.

A safetensors bag holds `features` (N, D) [or (1, N, D)] in float16/bfloat16/float32/float64 and
`coords` (N, 2), integer or float, plus optional string metadata `patch_size` and `bag_id`.
HDF5 bags (TRIDENT, CLAM, STAMP) are recognised by their signature, whatever the file is called,
and read by smcli.h5bags; both readers end in the same checks (`validate_tensors`).
Every problem is a BagError whose message starts with the file name.
"""

from __future__ import annotations

import math
import os
import reprlib
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from smcli.errors import BagError

if TYPE_CHECKING:
    from torch import Tensor
from smcli.graph import infer_patch_step

FEATURE_DTYPES = ("float16", "bfloat16", "float32", "float64")
BAG_SUFFIXES = (".safetensors", ".h5", ".hdf5")
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"  # at offset 0 of every file h5py writes (no user block)


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
    metadata: the file's string metadata, plus `format` (safetensors, trident, clam, stamp or h5)
    and, when patch_size is set, `patch_size_source` (where in the file it was read).
    """

    path: Path
    bag_id: str
    features: Tensor
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


NOT_REGULAR = {  # what stat says an input is, when it is not a plain file
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


def check_input(path: Path) -> None:
    """Refuse, before anything opens it, an input that is not a regular file with a UTF-8 name.

    Opening a FIFO or a terminal would block the run (and the signal handlers) forever, and a
    device would be read without end; safetensors cannot open a file whose name is not UTF-8.
    """
    try:
        mode = os.stat(path).st_mode  # follows symlinks: a link to a bag is a bag
    except FileNotFoundError:
        raise _fail(path, "no such file") from None
    except PermissionError:
        raise _fail(path, "permission denied") from None
    except (OSError, ValueError) as err:
        raise _fail(path, f"cannot stat ({getattr(err, 'strerror', None) or type(err).__name__})") from None
    if not stat.S_ISREG(mode):
        kind = NOT_REGULAR.get(stat.S_IFMT(mode), "not a regular file")
        raise _fail(path, f"is {kind}, not a bag file")
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise _fail(path, "the file name is not valid UTF-8: rename the file (bag ids are UTF-8)") from None


def is_hdf5(path: Path) -> bool:
    """True if the file starts with the HDF5 signature (content, not extension, decides).

    Opened non-blocking: a FIFO or terminal given by mistake answers False instead of hanging.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except (OSError, ValueError):
        return False
    try:
        return os.read(fd, len(HDF5_SIGNATURE)) == HDF5_SIGNATURE
    except OSError:
        return False
    finally:
        os.close(fd)


def peek_bag_id(path: Path) -> str:
    """The bag id from the file's header alone (no tensor is read); the file stem if unreadable."""
    try:
        check_input(path)
        if is_hdf5(path):  # h5 bags carry no bag id: the stem, as for their own tools
            return path.stem
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            bag_id = (handle.metadata() or {}).get("bag_id")
            return bag_id if isinstance(bag_id, str) and bag_id else path.stem
    except Exception:  # the real read reports what is wrong with the file
        return path.stem


def load_bag(path: str | Path, keys: BagKeys = BagKeys(), with_labels: bool = True) -> Bag:
    """Read and validate one bag: HDF5 if the file says so, safetensors otherwise."""
    path = Path(path)
    check_input(path)
    if is_hdf5(path):
        from smcli.h5bags import load_h5_bag

        return load_h5_bag(path, keys, with_labels)
    return _load_safetensors_bag(path, keys, with_labels)


def _load_safetensors_bag(path: Path, keys: BagKeys, with_labels: bool) -> Bag:
    from safetensors import SafetensorError, safe_open

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
        raise _fail(
            path, f"not a safetensors bag or corrupt header ({detail[:120]}); not an HDF5 file either"
        ) from None

    features, coords, labels = validate_tensors(path, features, coords_tensor, labels_tensor, keys)
    patch_size = None
    metadata["format"] = "safetensors"
    if "patch_size" in metadata:
        patch_size = parse_patch_size(path, metadata["patch_size"], "metadata patch_size")
        metadata["patch_size_source"] = "metadata['patch_size']"
    bag_id = metadata.get("bag_id") or path.stem
    return Bag(path, bag_id, features, coords, patch_size, labels, metadata)


def validate_tensors(path: Path, features, coords, labels, keys: BagKeys):
    """The checks every reader ends in: dtypes, shapes, finiteness, row counts, 0/1 labels.

    features: torch (N, D) or (1, N, D); coords: torch (N, 2) or (1, N, 2); labels: torch (N,) or None.
    Returns (features (N, D) torch, coords (N, 2) numpy, labels (N,) int8 numpy or None).
    Error messages use the names in `keys` (the names inside the file).
    """
    features = _check_features(path, features, keys.features)
    coords = _check_coords(path, coords, keys.coords)
    if coords.shape[0] != features.shape[0]:
        raise _fail(
            path, f"{keys.features} has {features.shape[0]} rows but {keys.coords} has {coords.shape[0]}"
        )
    if features.shape[0] == 0:
        raise _fail(path, "empty bag (0 patches): nothing to score")
    if labels is not None:
        labels = _check_labels(path, labels, keys.labels, coords.shape[0])
    return features, coords, labels


def parse_patch_size(path: Path, value, where: str) -> float:
    """A stored patch step (string or number) -> positive float; `where` names it in errors."""
    shown = reprlib.repr(value)  # an attribute may be a long array: never a page of digits
    if isinstance(value, (complex, np.complexfloating, np.ndarray)):  # float() would warn or drop parts
        raise _fail(path, f"{where} {shown} is not a number")
    try:
        patch_size = float(value)
    except (TypeError, ValueError, OverflowError):
        raise _fail(path, f"{where} {shown} is not a number") from None
    if not (math.isfinite(patch_size) and patch_size > 0):
        raise _fail(path, f"{where} {shown} must be positive")
    return patch_size


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


def _dtype_name(tensor) -> str:
    return str(tensor.dtype).replace("torch.", "")


def _numeric_array(tensor) -> np.ndarray | None:
    """The tensor as a numpy integer/float array, or None for bool, complex, float8 and the like."""
    import torch

    if tensor.dtype == torch.bool or tensor.is_complex():
        return None
    if tensor.dtype in (torch.bfloat16, torch.float16):
        tensor = tensor.to(torch.float32)
    try:
        array = tensor.numpy()
    except TypeError:  # dtypes numpy has no counterpart for (float8, uint16 on old numpy, ...)
        return None
    return array if array.dtype.kind in "iuf" else None


def _check_coords(path: Path, coords, name: str) -> np.ndarray:
    if coords.dim() == 3 and coords.shape[0] == 1:
        coords = coords[0]
    if coords.dim() != 2 or coords.shape[1] != 2:
        raise _fail(path, f"{name} must have shape (N, 2), got {tuple(coords.shape)}")
    array = _numeric_array(coords)
    if array is None:
        raise _fail(path, f"{name} has dtype {_dtype_name(coords)}; expected integer or float")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        bad = int((~np.isfinite(array).all(axis=1)).sum())
        raise _fail(path, f"{name} has non-finite values in {bad} rows")
    return array


def _check_labels(path: Path, labels, name: str, n: int) -> np.ndarray:
    import torch

    array = None if labels.dtype == torch.bool else _numeric_array(labels)
    if labels.dtype == torch.bool:
        array = labels.numpy()
    if array is None:
        raise _fail(path, f"{name} has dtype {_dtype_name(labels)}; expected 0/1 integers")
    array = array.reshape(-1)
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
