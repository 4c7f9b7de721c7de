"""The safetensors bag reader (smcli.readers' interface): numpy arrays, no torch.

A safetensors bag holds `features` (N, D) [or (1, N, D)] in float16/bfloat16/float32/float64 and
`coords` (N, 2), integer or float, plus optional string metadata `patch_size` and `bag_id`.
It is the fallback format: it claims every file the other readers do not.
"""

from __future__ import annotations

from pathlib import Path

from smcli.errors import BagError
from smcli.readers import BagKeys, RawBag


def claims(path: Path) -> bool:
    return True


def peek_bag_id(path: Path) -> str | None:
    """metadata['bag_id'] from the header (no tensor is read); None if absent or unreadable."""
    from smcli.tensorfile import read_metadata

    try:
        return read_metadata(path).get("bag_id") or None
    except Exception:  # the real read reports what is wrong with the file
        return None


def read(path: Path, keys: BagKeys = BagKeys(), with_labels: bool = True) -> RawBag:
    from safetensors import SafetensorError

    from smcli.tensorfile import read_safetensors

    try:
        wanted = [keys.features, keys.coords] + ([keys.labels] if with_labels else [])
        read = read_safetensors(path, wanted)
    except PermissionError:
        raise BagError(f"{path}: permission denied") from None
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as err:
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BagError(
            f"{path}: not a safetensors bag or corrupt header ({detail[:120]}); not an HDF5 file either"
        ) from None
    for key in (keys.features, keys.coords):
        if key not in read.names:
            present = ", ".join(sorted(read.names)) or "none"
            raise BagError(f"{path}: no '{key}' tensor (keys present: {present})")
    metadata = dict(read.metadata, format="safetensors")
    step = ("metadata patch_size", metadata["patch_size"]) if "patch_size" in metadata else None
    return RawBag(
        features=read.tensors[keys.features],
        coords=read.tensors[keys.coords],
        labels=read.tensors.get(keys.labels),
        names=keys,
        metadata=metadata,
        bag_id=metadata.get("bag_id") or path.stem,
        features_dtype=read.stored_dtypes[keys.features],
        step=step,
    )
