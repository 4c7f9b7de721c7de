"""What scoring produces, below everything that consumes it (writers, progress, the CLI).

BagSummary is one row of `_bags.csv`; BagResult adds the per-instance table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

INSTANCE_COLUMNS = ["bag_id", "instance", "x", "y", "attention_logit", "attention_weight"]


@dataclass
class BagSummary:
    """One row of `_bags.csv`."""

    bag_id: str
    path: str
    n_instances: int | None = None
    n_edges: int | None = None
    logit: float | None = None
    probability: float | None = None
    status: str = "ok"
    error: str = ""
    seconds: float = 0.0
    patch_step: float | None = None
    patch_step_source: str = ""
    coords_units: str = ""  # the unit of x, y and patch_step (smcli.units): level-0 pixels or micrometres
    dist_thr: float | None = None
    warnings: list[str] = field(default_factory=list)
    auroc: float | None = None  # attention_logit vs instance labels, when the bag has both classes
    input_bytes: int | None = None
    model_sha256: str = ""
    device: str = ""
    smcli_version: str = ""
    scored_at: str = ""  # UTC, ISO 8601; kept out of the tables so they are reproducible
    # an ensemble (smcli.ensemble): how it combines, and each model's figures, in -m order
    ensemble: str = ""  # "mean" | "max"; "" for one model
    model_names: list[str] = field(default_factory=list)
    model_probabilities: list[float | None] = field(default_factory=list)
    model_aurocs: list[float | None] = field(default_factory=list)

    def provenance(self, model_config_json: str = "") -> dict[str, str]:
        """Key-value metadata for a bag's table: how its numbers were made (no wall-clock time)."""
        fields = {
            "smcli_version": self.smcli_version,
            "bag_id": self.bag_id,
            "input_path": self.path,
            "input_bytes": self.input_bytes,
            "model_sha256": self.model_sha256,
            "model_config": model_config_json,
            "patch_step": self.patch_step,
            "patch_step_source": self.patch_step_source,
            "coords_units": self.coords_units,
            "dist_thr": self.dist_thr,
            "n_edges": self.n_edges,
            "device": self.device,
        }
        return {f"smcli.{key}": "" if value is None else str(value) for key, value in fields.items()}


@dataclass
class BagResult:
    """A bag's summary row and, when it was scored, its per-instance table."""

    summary: BagSummary
    arrow: Any = None  # pyarrow.Table with INSTANCE_COLUMNS (+ label); None when not scored
    _frame: Any = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return self.summary.status == "ok"

    @property
    def table(self):
        """The per-instance table as a pandas DataFrame (converted on first use), or None."""
        if self.arrow is not None and self._frame is None:
            self._frame = self.arrow.to_pandas()
        return self._frame
