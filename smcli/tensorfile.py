"""Read a .safetensors file into numpy arrays, without torch.

safetensors' numpy loader cannot make bfloat16 arrays (numpy has no such dtype), so bfloat16
tensors are decoded here by hand: a bfloat16 is the high half of a float32, so the stored uint16
shifted left by 16 bits and viewed as float32 is the exact value. Dtypes numpy cannot hold at all
(float8) come back as `Unreadable` (dtype name and shape), so callers can say what is wrong.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SAFETENSORS_DTYPES = {  # header names -> the numpy/torch names
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "U16": "uint16",
    "I16": "int16",
    "U32": "uint32",
    "I32": "int32",
    "U64": "uint64",
    "I64": "int64",
    "F16": "float16",
    "BF16": "bfloat16",
    "F32": "float32",
    "F64": "float64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}
NUMPY_READABLE = {"BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64", "F16", "F32", "F64"}


@dataclass(frozen=True)
class Unreadable:
    """A tensor numpy cannot represent: its dtype (torch's name) and shape, for error messages."""

    dtype: str
    shape: tuple[int, ...]

    @property
    def ndim(self) -> int:
        return len(self.shape)


@dataclass
class TensorFile:
    """What read_safetensors returns: the tensors asked for, every name in the file, the metadata."""

    tensors: dict[str, np.ndarray | Unreadable]
    names: list[str]
    metadata: dict[str, str]
    stored_dtypes: dict[str, str]  # name -> dtype as stored (bfloat16 for decoded tensors)


def read_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a safetensors file (header only). Raises what safe_open raises."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as handle:
        return dict(handle.metadata() or {})


def read_safetensors(path: str | Path, names: list[str] | None = None) -> TensorFile:
    """Read the named tensors (all when None; absent names are skipped) as numpy arrays.

    Raises what safetensors raises for a file that is not valid safetensors.
    """
    from safetensors import safe_open

    tensors: dict[str, np.ndarray | Unreadable] = {}
    stored: dict[str, str] = {}
    with safe_open(str(path), framework="numpy") as handle:
        keys = list(handle.keys())
        metadata = dict(handle.metadata() or {})
        for name in keys if names is None else [n for n in names if n in keys]:
            piece = handle.get_slice(name)
            dtype = piece.get_dtype()
            stored[name] = SAFETENSORS_DTYPES.get(dtype, dtype.lower())
            if dtype == "BF16":
                tensors[name] = _read_bfloat16(Path(path), name)
                continue
            if dtype in NUMPY_READABLE:
                tensors[name] = handle.get_tensor(name)
            else:  # a dtype numpy has no counterpart for (float8, ...)
                tensors[name] = Unreadable(stored[name], tuple(piece.get_shape()))
    return TensorFile(tensors, keys, metadata, stored)


def _read_bfloat16(path: Path, name: str) -> np.ndarray:
    """One bfloat16 tensor as float32 (exact). safe_open has checked the header and offsets."""
    with open(path, "rb") as handle:
        header_length = int.from_bytes(handle.read(8), "little")
        entry: dict[str, Any] = json.loads(handle.read(header_length))[name]
        begin, end = entry["data_offsets"]
        raw = np.fromfile(handle, dtype="<u2", count=(end - begin) // 2, offset=begin)
    return decode_bfloat16(raw).reshape(entry["shape"])


def decode_bfloat16(raw: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32 values, exactly: the bits become the high half."""
    bits = raw.astype(np.uint32)
    bits <<= 16
    return bits.view(np.float32)


def write_safetensors(path: str | Path, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """Write numpy arrays with string metadata (safetensors' own writer)."""
    from safetensors.numpy import save_file

    # np.require, not np.ascontiguousarray: that one turns a 0-d array (sm.sm.coef) into shape (1,)
    arrays = {k: np.require(v, requirements="C") for k, v in tensors.items()}
    try:
        save_file(arrays, str(path), metadata=metadata)
    except OSError:
        raise
    except Exception as err:  # SafetensorError wraps an OS error in its text: give it back as OSError
        os_error = _os_error(str(err))
        if os_error is None:
            raise
        raise os_error from None


def _os_error(message: str) -> OSError | None:
    """The OSError behind a safetensors failure ("... (os error 28) ..."), None if it names none."""
    import os
    import re

    found = re.search(r"\(os error (\d+)\)", message)
    if found is None:
        return None
    code = int(found.group(1))
    return OSError(code, os.strerror(code))
