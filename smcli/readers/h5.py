"""The HDF5 bag reader: files as the common patch-feature tools write them (smcli.readers' interface).

Layouts (dataset names are the defaults; --features-key / --coords-key / --labels-key override):

- TRIDENT: `features` (N, D) float32, `coords` (N, 2) int64 level-0 pixels; attributes on
  `coords`: patch_size (at the target magnification), patch_size_level0, level0_magnification,
  target_magnification, ... The step between neighbouring patches in coords units is
  `patch_size_level0` (patch_size 256 at 20x on a 40x slide is 512 level-0 pixels; dividing
  level-0 coords by 256 would leave every patch two cells from its neighbours: no edges).
- CLAM: `features` (N, D) float32, `coords` (N, 2) int32 level-0 pixels, no attributes; the
  step is inferred from the coords later (Bag.patch_size None).
- STAMP: `feats` (or `patch_embeddings`) (N, D) float16, `coords` (N, 2) float micrometres;
  attribute `tile_size_um` on the file (STAMP >= 2.1) or on `coords`: the step, in micrometres.

Anything else with the named datasets reads as format "h5" (step inferred). A leading batch axis
of 1 and an optional `labels` dataset (N,) are accepted, as for safetensors. h5py is an optional
dependency (`pip install 'smcli[h5]'`), imported only when an HDF5 file is met.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from smcli.errors import BagError
from smcli.readers import COORDS_UNITS, BagKeys, RawBag

STAMP_FEATURES = ("feats", "patch_embeddings")  # tried, in order, when --features-key is the default
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"  # at offset 0 of every file h5py writes (no user block)


def _fail(path: Path, message: str) -> BagError:
    return BagError(f"{path}: {message}")


def import_h5py(path: Path):
    """h5py, or a BagError naming the extra that installs it."""
    try:
        import h5py
    except ImportError:
        raise _fail(path, "reading h5 bags needs h5py: pip install 'smcli[h5]'") from None
    return h5py


def dataset_names(handle) -> list[str]:
    """Full names of every dataset in an open h5py File (groups walked), sorted."""
    import h5py

    names: list[str] = []
    handle.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    return sorted(names)


def claims(path: Path) -> bool:
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


def peek_bag_id(path: Path) -> str | None:
    """h5 bags carry no bag id: the caller uses the file stem, as the tools that wrote them do."""
    return None


def read(path: Path, keys: BagKeys = BagKeys(), with_labels: bool = True) -> RawBag:
    """Read one HDF5 bag (TRIDENT, CLAM, STAMP or plain h5) as stored; smcli.bags validates it."""
    h5py = import_h5py(path)
    try:
        with h5py.File(path, "r") as handle:
            names = dataset_names(handle)
            fallbacks = STAMP_FEATURES if keys.features == BagKeys().features else ()
            features_name = _pick(path, names, (keys.features, *fallbacks))
            coords_name = _pick(path, names, (keys.coords,))
            features = _read(handle[features_name], path)
            coords = _read(handle[coords_name], path)
            labels = _read(handle[keys.labels], path) if with_labels and keys.labels in names else None
            root_attrs = _read_attrs(path, handle, "", ROOT_ATTRS)
            coords_attrs = _read_attrs(path, handle[coords_name], f"{coords_name}.", COORDS_ATTRS)
    except BagError:
        raise
    except PermissionError:
        raise _fail(path, "permission denied") from None
    except (OSError, ValueError, RuntimeError, TypeError, KeyError) as err:
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise _fail(path, f"not a readable HDF5 bag ({detail[:120]})") from None

    names_used = BagKeys(features_name, coords_name, keys.labels)
    fmt = detect_format(features_name, coords_name, root_attrs, coords_attrs)
    metadata = {"format": fmt}
    if fmt in COORDS_UNITS:
        metadata["coords_units"] = COORDS_UNITS[fmt]
    found = _step_attribute(fmt, root_attrs, coords_attrs, coords_name)
    step = None if found is None else (found[0], _attr_value(found[1]))
    return RawBag(
        features=_numeric(path, features, features_name),
        coords=_numeric(path, coords, coords_name),
        labels=None if labels is None else _numeric(path, labels, keys.labels),
        names=names_used,
        metadata=metadata,
        bag_id=path.stem,
        features_dtype=str(features.dtype),
        step=step,
    )


ROOT_ATTRS = ("unit", "tile_size_um")  # the only attributes format detection reads
COORDS_ATTRS = ("patch_size_level0", "tile_size_um")


def _read_attrs(path: Path, obj, prefix: str, names: tuple[str, ...]) -> dict:
    """The named attributes of an h5 object that it has; one unreadable is that bag's error."""
    found = {}
    for name in names:
        try:
            if name in obj.attrs:
                found[name] = obj.attrs[name]
        except Exception as err:  # h5py raises OSError, TypeError, ValueError... for odd types
            what = f"attribute {prefix}attrs[{name!r}]"
            raise _fail(path, f"{what} cannot be read ({type(err).__name__})") from None
    return found


def detect_format(features_name: str, coords_name: str, root_attrs: dict, coords_attrs: dict) -> str:
    """'stamp', 'trident', 'clam' or 'h5', from the dataset names and attributes the tools write.

    Attributes of any type are accepted: only a string `unit` equal to 'um' counts as one.
    """
    unit = _attr_value(root_attrs.get("unit", ""))
    if (
        features_name in STAMP_FEATURES
        or "tile_size_um" in root_attrs
        or "tile_size_um" in coords_attrs
        or (isinstance(unit, str) and unit == "um")
    ):
        return "stamp"
    if "patch_size_level0" in coords_attrs:
        return "trident"
    if features_name == "features" and coords_name == "coords":
        return "clam"
    return "h5"


def _step_attribute(fmt: str, root_attrs: dict, coords_attrs: dict, coords_name: str):
    """(where, raw value) of the attribute holding the patch step in coords units, or None."""
    if fmt == "trident":
        return f"{coords_name}.attrs['patch_size_level0']", coords_attrs["patch_size_level0"]
    if fmt == "stamp":
        if "tile_size_um" in root_attrs:
            return "attrs['tile_size_um']", root_attrs["tile_size_um"]
        if "tile_size_um" in coords_attrs:
            return f"{coords_name}.attrs['tile_size_um']", coords_attrs["tile_size_um"]
    return None


def _pick(path: Path, names: list[str], candidates: tuple[str, ...]) -> str:
    """The first candidate dataset present, else a BagError listing what the file holds."""
    for name in candidates:
        if name.strip("/") in names:
            return name.strip("/")
    wanted = "'" + "', '".join(candidates) + "'"
    if len(candidates) > 1:
        wanted = wanted.rsplit(", ", 1)[0] + " or " + wanted.rsplit(", ", 1)[1]
    raise _fail(path, f"no {wanted} dataset (keys present: {', '.join(names) or 'none'})")


MAX_EXPANSION = 16  # declared bytes per stored byte: beyond real compression of features or coords
SMALL_DATASET = 64 << 20  # bytes a dataset may declare whatever it stores (e.g. compressed labels)


def _read(dataset, path: Path) -> np.ndarray:
    """The whole dataset as a native-byte-order numpy array, if its size is believable.

    h5 datasets declare a shape; unwritten chunks read as fill values, so a 2 KB file can declare
    500k x 1024 floats (2 GB) or 19 GiB. The declared size is compared with the bytes actually
    stored before anything is read.
    """
    declared = int(np.prod(dataset.shape, dtype=np.float64)) * dataset.dtype.itemsize
    stored = int(dataset.id.get_storage_size())
    if declared > max(SMALL_DATASET, MAX_EXPANSION * stored):
        raise _fail(
            path,
            f"{dataset.name.lstrip('/')} declares {tuple(dataset.shape)} {dataset.dtype} "
            f"({declared / 2**30:.3g} GiB) but the file stores {stored:,} bytes of it: "
            "unwritten or implausibly compressed; refused before reading",
        )
    array = np.asarray(dataset[()])
    if array.dtype.byteorder not in ("=", "|") and array.dtype.kind in "biuf":
        array = array.astype(array.dtype.newbyteorder("="))
    return array


def _numeric(path: Path, array: np.ndarray, name: str) -> np.ndarray:
    """A contiguous numeric array; strings, records and the like are errors."""
    if array.dtype.kind not in "biuf":
        raise _fail(path, f"{name} has dtype {array.dtype}; expected numbers")
    return np.ascontiguousarray(array)


def _attr_value(value):
    """An h5 attribute as a Python scalar: bytes decoded, one-element arrays unwrapped."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    try:
        array = np.asarray(value)
    except Exception:  # an object numpy cannot hold: left as it is, compared as it is
        return value
    if array.size == 1 and array.dtype.kind in "biuf":
        return array.reshape(()).item()
    if array.size == 1 and array.dtype.kind in "SUO":
        item = array.reshape(()).item()
        return item.decode("utf-8", errors="replace") if isinstance(item, bytes) else item
    return value
