"""Bag readers: one module per file format, behind one small interface that smcli.bags dispatches to.

A reader module has three functions:

    claims(path) -> bool                         is this file mine? (by content, not by name)
    read(path, keys, with_labels) -> RawBag      the arrays as stored, the names they had, metadata
    peek_bag_id(path) -> str | None              the bag id from the header alone, if the format has one

READERS lists them in the order they are asked; safetensors, the fallback, claims every file and
comes last. smcli.bags validates every RawBag the same way and makes the Bag. Adding a format is
one new module here plus one line in READERS.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

READERS = ("smcli.readers.h5", "smcli.readers.safetensors")

COORDS_UNITS = {  # what each tool's coords count in (never guessed for other files)
    "trident": "level-0 pixels",
    "clam": "level-0 pixels",
    "safetensors": "level-0 pixels",
    "stamp": "micrometres",
}


@dataclass(frozen=True)
class BagKeys:
    """Tensor names inside a bag file."""

    features: str = "features"
    coords: str = "coords"
    labels: str = "labels"


@dataclass
class RawBag:
    """A bag as a reader found it, before validation.

    features (N, D) or (1, N, D), coords (N, 2) or (1, N, 2), labels (N,) or None: numpy arrays as
    stored (bfloat16 decoded to float32), or smcli.tensorfile.Unreadable for dtypes numpy lacks.
    names: the names the arrays had in the file (error messages use them). metadata: the file's
    string metadata plus `format` (and `coords_units` when the tool is known). step: (where in the
    file, raw value) of the stored patch step, or None.
    """

    features: Any
    coords: Any
    labels: Any
    names: BagKeys
    metadata: dict[str, str] = field(default_factory=dict)
    bag_id: str = ""
    features_dtype: str = ""
    step: tuple[str, Any] | None = None


def reader_for(path: Path) -> Any:
    """The first reader module in READERS that claims the file."""
    for name in READERS:
        module = importlib.import_module(name)
        if module.claims(path):
            return module
    raise LookupError(f"no reader for {path}")  # unreachable: the last reader claims everything
