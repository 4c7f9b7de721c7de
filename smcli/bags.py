"""Load bags (features + coordinates), validate them, and work out their patch geometry.

The file formats live in smcli.readers (safetensors, and TRIDENT/CLAM/STAMP HDF5 recognised by
their signature whatever the file is called); every reader's RawBag ends in the same checks here
(`validate_tensors`) and becomes a `Bag`. Every problem is a BagError whose message starts with
the file name.
"""

from __future__ import annotations

import math
import os
import reprlib
import stat
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from smcli.errors import BagError, UsageError
from smcli.graph import infer_patch_step
from smcli.numeric import FLOAT32_MAX, scan_rows
from smcli.readers import BagKeys, RawBag, reader_for
from smcli.tensorfile import Unreadable

__all__ = ["Bag", "BagKeys", "Geometry", "find_bags", "load_bag", "peek_bag_id", "resolve_geometry"]

FEATURE_DTYPES = ("float16", "bfloat16", "float32", "float64")
BAG_SUFFIXES = (".safetensors", ".h5", ".hdf5")


@dataclass
class Bag:
    """One slide's bag.

    features: numpy (N, D) as stored (float16/float32/float64 kept, the model converts per
    chunk; bfloat16, which numpy lacks, decoded exactly to float32). features_dtype: as stored.
    coords: (N, 2) numpy array as stored.  labels: (N,) 0/1 numpy array, or None.
    patch_size: step from the file's metadata, or None.
    metadata: the file's string metadata, plus `format` (safetensors, trident, clam, stamp or h5)
    and, when patch_size is set, `patch_size_source` (where in the file it was read).
    """

    path: Path
    bag_id: str
    features: np.ndarray
    coords: np.ndarray
    patch_size: float | None = None
    labels: np.ndarray | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    features_dtype: str = ""
    feature_peak: float | None = None  # largest |feature|, when the reader's checks measured it

    def __post_init__(self) -> None:
        if not self.features_dtype:
            self.features_dtype = str(self.features.dtype)

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
            try:
                found.extend(sorted(p for p in item.iterdir() if p.suffix in BAG_SUFFIXES and p.is_file()))
            except OSError as err:  # an input directory that cannot be listed: a usage problem
                reason = err.strerror or type(err).__name__
                raise UsageError(f"{item}: cannot list the directory ({reason})") from None
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
    if not os.access(path, os.R_OK):  # else the format sniffing reads nothing and blames the format
        raise _fail(path, "permission denied")
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise _fail(path, "the file name is not valid UTF-8: rename the file (bag ids are UTF-8)") from None


def is_hdf5(path: Path) -> bool:
    """True if the file starts with the HDF5 signature (content, not extension, decides)."""
    from smcli.readers import h5

    return h5.claims(path)


def peek_bag_id(path: Path) -> str:
    """The bag id from the file's header alone (no tensor is read); the file stem if it has none
    or cannot be read (the real read then says what is wrong with the file)."""
    try:
        check_input(path)
        bag_id = reader_for(path).peek_bag_id(path)
    except Exception:
        return path.stem
    return bag_id if isinstance(bag_id, str) and bag_id else path.stem


def load_bag(path: str | Path, keys: BagKeys = BagKeys(), with_labels: bool = True) -> Bag:
    """Read one bag with the reader that claims it, validate it, and make the Bag."""
    path = Path(path)
    check_input(path)
    raw = reader_for(path).read(path, keys, with_labels)
    return bag_from_raw(path, raw)


def bag_from_raw(path: Path, raw: RawBag) -> Bag:
    """The checks every format ends in, then the Bag."""
    peak: list[float] = []
    features, coords, labels = validate_tensors(path, raw.features, raw.coords, raw.labels, raw.names, peak)
    metadata = dict(raw.metadata)
    patch_size = None
    if raw.step is not None:
        where, value = raw.step
        patch_size = parse_patch_size(path, value, where)
        metadata["patch_size_source"] = where
    return Bag(
        path,
        raw.bag_id or path.stem,
        features,
        coords,
        patch_size,
        labels,
        metadata,
        raw.features_dtype,
        peak[0] if peak else None,
    )


def validate_tensors(path: Path, features, coords, labels, keys: BagKeys, peak: list[float] | None = None):
    """The checks every reader ends in: dtypes, shapes, finiteness, row counts, 0/1 labels.

    features: numpy (N, D) or (1, N, D); coords: (N, 2) or (1, N, 2); labels: (N,) or None; any of
    them may be an `Unreadable` (a dtype numpy cannot hold).
    Returns (features (N, D), coords (N, 2), labels (N,) int8 or None), all numpy.
    Error messages use the names in `keys` (the names inside the file). `peak`, if given, receives
    the largest |feature| (found on the finiteness pass).
    """
    features, feature_peak = _check_features(path, features, keys.features)
    if peak is not None:
        peak.append(feature_peak)
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


def _check_features(path: Path, features, name: str) -> tuple[np.ndarray, float]:
    if _dtype_name(features) not in FEATURE_DTYPES:
        raise _fail(
            path, f"{name} has dtype {_dtype_name(features)}; expected one of {', '.join(FEATURE_DTYPES)}"
        )
    if features.ndim == 3 and features.shape[0] == 1:
        features = features[0]
    if features.ndim != 2:
        raise _fail(path, f"{name} must be 2-D (N, D) or (1, N, D), got shape {tuple(features.shape)}")
    scan, n = scan_rows(features), features.shape[0]
    if scan.non_finite_rows:
        raise _fail(path, f"{name} has non-finite values (NaN or inf) in {scan.non_finite_rows} of {n} rows")
    if scan.beyond_float32_rows:  # finite in float64, inf in the float32 smcli computes in
        raise _fail(
            path,
            f"{name} has values beyond float32's range (|x| up to {scan.peak:.3g}, max {FLOAT32_MAX:.3g}) "
            f"in {scan.beyond_float32_rows} of {features.shape[0]} rows: not representable in float32",
        )
    return features, scan.peak


def _dtype_name(tensor) -> str:
    return str(tensor.dtype)


def _numeric_array(tensor) -> np.ndarray | None:
    """The tensor as a numpy integer/float array (float16 widened), or None for bool, complex, float8."""
    if isinstance(tensor, Unreadable) or tensor.dtype.kind not in "iuf":
        return None
    return tensor.astype(np.float32) if tensor.dtype == np.float16 else tensor


def _check_coords(path: Path, coords, name: str) -> np.ndarray:
    if coords.ndim == 3 and coords.shape[0] == 1:
        coords = coords[0]
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise _fail(path, f"{name} must have shape (N, 2), got {tuple(coords.shape)}")
    array = _numeric_array(coords)
    if array is None:
        raise _fail(path, f"{name} has dtype {_dtype_name(coords)}; expected integer or float")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        bad = int((~np.isfinite(array).all(axis=1)).sum())
        raise _fail(path, f"{name} has non-finite values in {bad} rows")
    return array


def _check_labels(path: Path, labels, name: str, n: int) -> np.ndarray:
    is_bool = not isinstance(labels, Unreadable) and labels.dtype == np.bool_
    array = labels if is_bool else _numeric_array(labels)
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
