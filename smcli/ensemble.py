"""Model ensembles: several checkpoints score each bag once, on one graph, side by side.

`smcli score BAG -m A -m B [--ensemble mean|max]`: the graph is built once per bag (the models must
agree on in_dim and every graph option, or nothing is scored); each model scores the bag exactly as
it would alone (its columns equal a single-model run's bit for bit); the ensemble combines them:

- `attention_weight` = the mean (or max) of the models' attention weights;
- `attention_logit` = the log of that, computed in log space (log-mean-exp / max of each model's
  log-softmax), so it ranks as the weight does, never underflows, and heatmap/geojson read an
  ensemble table as any other;
- the bag probability = the mean (or max) of the models' probabilities; `logit` its log-odds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from smcli.checkpoint import LoadedModel, ModelConfig, load_model
from smcli.errors import UsageError
from smcli.results import BagResult
from smcli.scoring import PreparedBag, ScoreOptions, bag_summary, instance_table, run_model

COMBINE = ("mean", "max")
SEPARATOR = ";"  # between the models' values in one `_bags.csv` cell (model_sha256, model_names, ...)


def model_names(paths: list[Path]) -> list[str]:
    """Each checkpoint's file stem; a stem used twice becomes `<stem>_<position>` (1-based).

    A stem that cannot be a column suffix or a list item (empty, `;`, `,`, control characters) is
    named by position alone: `model_<position>`.
    """
    stems = [
        p.stem if p.stem and p.stem.isprintable() and not any(c in p.stem for c in ';,"') else ""
        for p in paths
    ]
    names = [
        f"model_{i + 1}" if not stem else f"{stem}_{i + 1}" if stems.count(stem) > 1 else stem
        for i, stem in enumerate(stems)
    ]
    if len(set(names)) != len(names):
        raise UsageError(f"model names clash after numbering: {', '.join(names)} (rename a checkpoint)")
    return names


@dataclass
class Ensemble:
    """Several loaded models scoring as one. Quacks like LoadedModel where a bag is prepared
    (in_dim, config's graph options, feature_limit) and scores a prepared bag itself."""

    models: list[LoadedModel]
    names: list[str]
    combine: str = "mean"

    @property
    def config(self) -> ModelConfig:
        return self.models[0].config  # the graph options, equal for every member (checked at load)

    @property
    def in_dim(self) -> int:
        return self.models[0].in_dim

    @property
    def feature_limit(self) -> float:
        return min(model.feature_limit for model in self.models)

    @property
    def sha256(self) -> str:
        """Every model's hash, in order: `--skip-existing` keeps a file only for the same list."""
        return SEPARATOR.join(model.sha256 for model in self.models)

    def config_json(self) -> str:
        import json

        return json.dumps(
            {
                "ensemble": self.combine,
                "models": [
                    {"name": n, "sha256": m.sha256, "config": json.loads(m.config.to_json())}
                    for n, m in zip(self.names, self.models, strict=True)
                ],
            },
            sort_keys=True,
        )

    def score_prepared(self, prepared: PreparedBag, options: ScoreOptions) -> BagResult:
        """Score one prepared bag with every model (BagError for a problem with the bag)."""
        scores = [run_model(model, prepared, options.device) for model in self.models]
        log_weights = np.stack([s.logits - _log_sum_exp(s.logits) for s in scores])  # (K, N), float64
        weights = np.stack([s.weights for s in scores])  # (K, N), each model's float32 softmax
        if self.combine == "mean":
            combined_weight = weights.mean(axis=0, dtype=np.float64).astype(weights.dtype)
            top = log_weights.max(axis=0)
            combined_logit = top + np.log(np.exp(log_weights - top).mean(axis=0))
        else:
            combined_weight = weights.max(axis=0)
            combined_logit = log_weights.max(axis=0)
        logits = combined_logit.astype(scores[0].logits.dtype)  # (N,)

        members: dict[str, np.ndarray] = {}
        for name, score in zip(self.names, scores, strict=True):
            members[f"attention_logit_{name}"] = score.logits
            members[f"attention_weight_{name}"] = score.weights
        table = instance_table(prepared.bag, logits, combined_weight, options.top_k, members)

        probabilities = [s.probability for s in scores]
        probability = None
        if all(p is not None for p in probabilities):
            values = [float(p) for p in probabilities if p is not None]
            probability = sum(values) / len(values) if self.combine == "mean" else max(values)
        summary = bag_summary(
            prepared, logits, _log_odds(probability), probability, self.sha256, scores[0].device
        )
        summary.ensemble = self.combine
        summary.model_names = list(self.names)
        summary.model_probabilities = probabilities
        summary.model_aurocs = [s.auroc for s in scores]
        return BagResult(summary, table)


def _log_sum_exp(values: np.ndarray) -> float:
    top = float(values.max())
    return top + math.log(float(np.exp(values.astype(np.float64) - top).sum()))


def _log_odds(probability: float | None) -> float | None:
    if probability is None:
        return None
    if probability <= 0.0:
        return -math.inf
    if probability >= 1.0:
        return math.inf
    return math.log(probability) - math.log1p(-probability)


def load_ensemble(paths: list[Path], device: str = "cpu", combine: str = "mean") -> Ensemble:
    """Load every checkpoint; models that disagree on in_dim or a graph option are a UsageError
    (exit 2) naming the two files and the setting: one graph must serve them all."""
    if combine not in COMBINE:
        raise UsageError(f"--ensemble must be mean or max, got {combine!r}")
    names = model_names(paths)
    models = [load_model(path, device) for path in paths]
    first = models[0]
    for model in models[1:]:
        for setting, mine, theirs in (
            ("in_dim", first.in_dim, model.in_dim),
            ("patch_size", first.config.patch_size, model.config.patch_size),
            ("dist_thr", first.config.dist_thr, model.config.dist_thr),
            *[
                (name, getattr(first.config.graph, name), getattr(model.config.graph, name))
                for name in vars(first.config.graph)
            ],
        ):
            if mine != theirs:
                raise UsageError(
                    f"{model.path}: {setting} {theirs} differs from {first.path}'s {mine}: an ensemble's "
                    "models must share in_dim and the graph options"
                )
    return Ensemble(models, names, combine)
