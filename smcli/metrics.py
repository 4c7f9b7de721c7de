"""Localization metrics for per-patch scores against instance labels.

Only numpy is used here.
"""

from __future__ import annotations

import numpy as np


def auroc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Instance-level ROC AUC: P(score of a positive > score of a negative), ties counting 1/2.

    Computed from the Mann-Whitney U statistic with average ranks (one sort, O(N log N)):

        AUC = (R_pos - n_pos (n_pos + 1) / 2) / (n_pos n_neg)

    where R_pos is the sum of the (1-based, tie-averaged) ranks of the positive instances.

    scores: (N,) real, finite.  labels: (N,) 0/1 (or bool).
    Returns None when the labels hold only one class (the AUC is undefined then).
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    if scores.shape[0] != labels.shape[0]:
        raise ValueError(f"scores has {scores.shape[0]} values but labels has {labels.shape[0]}")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite (no NaN or inf)")
    if labels.dtype == np.bool_:
        positive = labels
    else:
        if not np.isin(labels, (0, 1)).all():
            raise ValueError("labels must be 0/1")
        positive = labels == 1
    n_pos = int(positive.sum())
    n_neg = int(positive.shape[0] - n_pos)
    if n_pos == 0 or n_neg == 0:
        return None

    # Average rank of every distinct score value: the values occupying ranks
    # start+1 .. start+count share the rank start + (count + 1) / 2.
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts).astype(np.float64)  # last 1-based rank of each value
    average_rank = ends - (counts - 1) / 2.0
    rank_sum = float(average_rank[inverse.reshape(-1)][positive].sum())
    u = rank_sum - n_pos * (n_pos + 1) / 2.0
    return u / (float(n_pos) * float(n_neg))
