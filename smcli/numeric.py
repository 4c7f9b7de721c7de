"""Ground-floor numeric checks in numpy: finiteness and float32 range, in bounded chunks.

Every value smcli computes with ends up in float32 (torchmil's precision): a finite float64 of
1e39 is inf there, and features near 3e38 overflow in the first projection. These helpers let the
readers, the checkpoint loader and the scorer refuse such numbers instead of scoring them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FLOAT32_MAX = float(np.finfo(np.float32).max)
CHUNK_ROWS = 16384  # rows per pass: temporaries stay a few MB whatever the bag


@dataclass(frozen=True)
class RowScan:
    """What one pass over a 2-D array found: rows holding NaN/inf, rows with a finite value beyond
    float32's range, and the largest |value| among the finite rows (0.0 for none)."""

    non_finite_rows: int
    beyond_float32_rows: int
    peak: float


def scan_rows(array: np.ndarray) -> RowScan:
    """One chunked pass of per-row min and max over `array` (N, D), any real float dtype.

    min/max propagate NaN and keep inf, so they find non-finite rows as isfinite().all() would,
    and give the peak magnitude on the way (no (N, D) temporary).
    """
    non_finite = beyond = 0
    peak = 0.0
    for start in range(0, array.shape[0], CHUNK_ROWS):
        chunk = array[start : start + CHUNK_ROWS]
        if chunk.shape[1] == 0:
            break
        low = chunk.min(axis=1).astype(np.float64)
        high = chunk.max(axis=1).astype(np.float64)
        finite = np.isfinite(low) & np.isfinite(high)
        non_finite += int(np.count_nonzero(~finite))
        magnitude = np.maximum(np.abs(low[finite]), np.abs(high[finite]))
        beyond += int(np.count_nonzero(magnitude > FLOAT32_MAX))
        if magnitude.size:
            peak = max(peak, float(magnitude.max()))
    return RowScan(non_finite, beyond, peak)


def count_non_finite(array: np.ndarray) -> int:
    """NaN and inf entries of a float array of any shape, counted in chunks."""
    flat = np.asarray(array).reshape(-1)
    step = CHUNK_ROWS * 64
    return sum(int(np.count_nonzero(~np.isfinite(flat[i : i + step]))) for i in range(0, flat.shape[0], step))
