"""`smcli convert-bag`: any bag smcli reads -> a safetensors bag, its geometry kept in the metadata."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from smcli.bags import Bag, BagKeys, load_bag
from smcli.errors import OutputError, UsageError
from smcli.files import atomic_path, prepare_file_output
from smcli.readers import COORDS_UNITS
from smcli.tensorfile import write_safetensors

OWN_METADATA = ("format", "patch_size_source")  # what the readers add; not the file's own


def convert_to_safetensors(path: Path, out: Path, keys: BagKeys = BagKeys(), overwrite: bool = False) -> Bag:
    """`smcli convert-bag`: any readable bag -> a safetensors bag, written atomically.

    Tensors `features` (N, D) as stored (bfloat16, which numpy cannot write, as float32: the same
    values), `coords` (N, 2) as stored, `labels` (N,) uint8 when present;
    string metadata `bag_id`, `source_format`, `coords_units` and `patch_size` (when the source
    knows its step), plus the string metadata of a safetensors source.
    """
    out = Path(out)
    if out.suffix != ".safetensors":
        raise UsageError(f"{out}: the output of convert-bag must end in .safetensors")
    if out.exists() and not overwrite:
        raise UsageError(f"{out}: output exists; pass --overwrite to replace it")
    bag = load_bag(path, keys)
    prepare_file_output(out, overwrite, UsageError)  # a missing parent directory is created
    fmt = bag.metadata.get("format", "safetensors")
    metadata = {k: v for k, v in bag.metadata.items() if k not in OWN_METADATA}
    metadata["bag_id"] = bag.bag_id
    metadata.setdefault("source_format", fmt)
    if fmt != "safetensors" and fmt in COORDS_UNITS:  # known from the tool; never guessed
        metadata.setdefault("coords_units", COORDS_UNITS[fmt])
    if bag.patch_size is not None:
        metadata["patch_size"] = str(float(bag.patch_size))
    tensors = {"features": bag.features, "coords": bag.coords}
    if bag.labels is not None:
        tensors["labels"] = bag.labels.astype(np.uint8)
    try:
        with atomic_path(out) as tmp:
            write_safetensors(tmp, tensors, metadata)
    except OSError as err:
        raise OutputError(f"{out}: cannot write ({err.strerror or type(err).__name__})") from None
    return bag
