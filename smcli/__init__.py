"""smcli: per-patch Sm attention for whole-slide bags, identical to torchmil 1.0.2."""

from __future__ import annotations

__version__ = "0.1.0"
