"""Statistics for `smcli evaluate`: bag-level metrics with bootstrap intervals, DeLong's test, and
the pooled instance-level AUROC resampled by bags.

Point estimates and curves come from scikit-learn (`pip install -e ".[eval]"`); what no well-kept
library offers is written here, each with its reference: DeLong's test for two correlated AUROCs
(neither scikit-learn nor scipy has it) and an exact bag-bootstrap of the pooled AUROC through a
bag-by-bag matrix of pair counts (resampling 10^7 instances 1000 times would not fit in memory).
Pure functions on numpy arrays; nothing here reads files or prints.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Estimate:
    """A statistic and its bootstrap percentile interval (None where it is undefined)."""

    value: float | None
    low: float | None = None
    high: float | None = None

    def as_dict(self) -> dict[str, float | None]:
        return {"value": self.value, "ci_low": self.low, "ci_high": self.high}


def sklearn_metrics():
    """scikit-learn's metrics module, imported on first use (1.5 s: only `evaluate` pays it)."""
    try:
        from sklearn import metrics
    except ImportError:
        from smcli.errors import UsageError

        raise UsageError('smcli evaluate needs scikit-learn: pip install -e ".[eval]"') from None
    return metrics


def roc_auc(targets: np.ndarray, scores: np.ndarray) -> float | None:
    """ROC AUC (scikit-learn), None when `targets` hold one class only.

    targets: (N,) 0/1.  scores: (N,) real.
    """
    targets = np.asarray(targets)
    if targets.size == 0 or targets.min() == targets.max():
        return None
    return float(sklearn_metrics().roc_auc_score(targets, scores))


def average_precision(targets: np.ndarray, scores: np.ndarray) -> float | None:
    """Average precision (scikit-learn: the step-wise area under the PR curve), None without positives."""
    targets = np.asarray(targets)
    if targets.size == 0 or targets.max() == 0:
        return None
    return float(sklearn_metrics().average_precision_score(targets, scores))


def fast_auroc(targets: np.ndarray, scores: np.ndarray) -> float | None:
    """roc_auc() without scikit-learn's per-call checks (~2 ms), for the bootstrap's thousands of
    draws: smcli.metrics.auroc, the Mann-Whitney form `_bags.csv` uses (equal to scikit-learn's
    to ~1e-15, a property the tests check)."""
    from smcli.metrics import auroc

    return auroc(scores, targets)


def fast_average_precision(targets: np.ndarray, scores: np.ndarray) -> float | None:
    """average_precision() for the bootstrap, by scikit-learn's definition: Σ_k (R_k − R_{k−1}) P_k
    over the distinct scores in decreasing order (tied scores form one step). Tests check equality."""
    targets = np.asarray(targets)
    n_pos = int(np.count_nonzero(targets))
    if n_pos == 0:
        return None
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    ordered = np.asarray(scores, dtype=np.float64)[order]
    hits = np.cumsum(targets[order] != 0)
    last_of_tie = np.r_[ordered[1:] != ordered[:-1], True]  # one step per distinct score
    true_positives = hits[last_of_tie].astype(np.float64)
    called = (np.flatnonzero(last_of_tie) + 1).astype(np.float64)
    recall_steps = np.diff(np.r_[0.0, true_positives]) / n_pos
    return float(np.sum(recall_steps * true_positives / called))


def threshold_metrics(targets: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float | None]:
    """Sensitivity, specificity and balanced accuracy of `score >= threshold` as the positive call."""
    targets = np.asarray(targets).astype(bool)
    called = np.asarray(scores) >= threshold
    n_pos, n_neg = int(targets.sum()), int((~targets).sum())
    sensitivity = float((called & targets).sum()) / n_pos if n_pos else None
    specificity = float((~called & ~targets).sum()) / n_neg if n_neg else None
    balanced = (
        (sensitivity + specificity) / 2 if sensitivity is not None and specificity is not None else None
    )
    return {"balanced_accuracy": balanced, "sensitivity": sensitivity, "specificity": specificity}


def youden_threshold(targets: np.ndarray, scores: np.ndarray) -> float:
    """The score threshold maximizing Youden's J = sensitivity + specificity − 1 (ties: the highest).

    Calls are `score >= threshold`, as in threshold_metrics. Needs both classes.
    """
    targets = np.asarray(targets).astype(bool)
    n_pos, n_neg = int(targets.sum()), int((~targets).sum())
    fpr, tpr, thresholds = sklearn_metrics().roc_curve(targets, scores, drop_intermediate=False)
    # J · n_pos · n_neg in whole numbers, so equal J compare equal (1 − 1/3 ≠ 2/3 in floats)
    scaled_j = np.rint(tpr * n_pos).astype(np.int64) * n_neg - np.rint(fpr * n_neg).astype(np.int64) * n_pos
    scaled_j[~np.isfinite(thresholds)] = np.iinfo(np.int64).min  # the +inf threshold calls nothing
    return float(thresholds[int(np.argmax(scaled_j))])  # the first maximum: thresholds descend


def stratified_resamples(targets: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, N) row indices: each row draws the positives and the negatives with replacement,
    separately, so every resample keeps the class counts (and both classes)."""
    targets = np.asarray(targets).astype(bool)
    rng = np.random.default_rng(seed)
    positives, negatives = np.flatnonzero(targets), np.flatnonzero(~targets)
    draws = []
    for group in (positives, negatives):
        if group.size:
            draws.append(group[rng.integers(0, group.size, size=(n_boot, group.size))])
    return np.concatenate(draws, axis=1) if draws else np.zeros((n_boot, 0), dtype=np.int64)


def percentile_interval(values: list[float | None]) -> tuple[float | None, float | None]:
    """The central CONFIDENCE interval of the bootstrap values (undefined draws left out)."""
    finite = np.array([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if finite.size == 0:
        return None, None
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(finite, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap(
    statistic: Callable[[np.ndarray], float | None], resamples: np.ndarray, value: float | None
) -> Estimate:
    """`value` with the percentile interval of `statistic(indices)` over the rows of `resamples`."""
    if value is None or resamples.shape[0] == 0:
        return Estimate(value)
    low, high = percentile_interval([statistic(rows) for rows in resamples])
    return Estimate(value, low, high)


# --- DeLong's test -----------------------------------------------------------------------------


def _midranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties sharing their average rank: (N,) -> (N,)."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts).astype(np.float64)
    return (ends - (counts - 1) / 2.0)[inverse.reshape(-1)]


def delong_components(targets: np.ndarray, scores: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """AUROC and DeLong's structural components for one model.

    Sun & Xu, "Fast implementation of DeLong's algorithm for comparing the areas under correlated
    ROC curves", IEEE Signal Processing Letters 21(11), 2014: with midranks over all slides (T),
    over the positives (T_x) and over the negatives (T_y),
    V10_i = (T_i − T_x,i) / n (placement of positive i among negatives), V01_j = 1 − (T_j − T_y,j) / m.

    targets: (N,) 0/1 with both classes.  scores: (N,).  Returns (auc, V10 (m,), V01 (n,)).
    """
    targets = np.asarray(targets).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    positives, negatives = scores[targets], scores[~targets]
    m, n = positives.size, negatives.size
    all_ranks = _midranks(np.concatenate([positives, negatives]))
    v10 = (all_ranks[:m] - _midranks(positives)) / n
    v01 = 1.0 - (all_ranks[m:] - _midranks(negatives)) / m
    return float(v10.mean()), v10, v01


def delong_test(targets: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray) -> float | None:
    """Two-sided p-value of DeLong's test that two models scoring the same slides have equal AUROC.

    targets: (N,) 0/1 with both classes; scores_a, scores_b: (N,) for the same slides in the same
    order. 1.0 when the AUROCs are equal with no variance (e.g. both perfect); None when their
    difference has zero variance yet they differ (no test is possible).
    """
    auc_a, v10_a, v01_a = delong_components(targets, scores_a)
    auc_b, v10_b, v01_b = delong_components(targets, scores_b)
    m, n = v10_a.size, v01_a.size
    s10 = np.cov(np.vstack([v10_a, v10_b])) if m > 1 else np.zeros((2, 2))
    s01 = np.cov(np.vstack([v01_a, v01_b])) if n > 1 else np.zeros((2, 2))
    contrast = np.array([1.0, -1.0])
    variance = float(contrast @ (s10 / m + s01 / n) @ contrast)
    difference = auc_a - auc_b
    if variance <= 1e-18:
        return 1.0 if abs(difference) <= 1e-12 else None
    z = abs(difference) / math.sqrt(variance)
    return math.erfc(z / math.sqrt(2.0))  # = 2 (1 − Φ(|z|))


def sign_flip_test(differences: np.ndarray, n_draws: int, seed: int, exact_up_to: int = 16) -> float | None:
    """Two-sided p-value of the paired sign-flip (permutation) test that the mean difference is 0.

    Under the null each paired difference is as likely to have either sign: p is the share of sign
    patterns whose |mean| reaches the observed one — all 2^n patterns for n <= exact_up_to (so 4
    bags can never give p below 2/16), else `n_draws` random ones, counted with the observed one.
    differences: (n,) per-bag AUROC of A minus B.
    """
    differences = np.asarray(differences, dtype=np.float64)
    n = differences.size
    if n == 0:
        return None
    observed = abs(differences.mean()) - 1e-12  # a pattern equal to the observed one counts
    if n <= exact_up_to:
        patterns = ((np.arange(2**n)[:, None] >> np.arange(n)) & 1) * 2 - 1  # (2^n, n) of ±1
        return float(np.mean(np.abs(patterns @ differences / n) >= observed))
    signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=(n_draws, n))
    hits = int(np.count_nonzero(np.abs(signs @ differences / n) >= observed))
    return (hits + 1) / (n_draws + 1)


# --- pooled instance-level AUROC, resampled by bag ------------------------------------------------


def pair_counts(positives: list[np.ndarray], negatives: list[np.ndarray]) -> np.ndarray:
    """(B, B) matrix C: C[a, b] = number of (positive of bag a, negative of bag b) pairs the scores
    order correctly, ties counting 1/2.

    For bag multiplicities w (a bootstrap draw of bags), the pooled AUROC of the drawn instances is
    wᵀ C w / ((w · n_pos)(w · n_neg)) — exact, without concatenating any instance.
    positives[b]: (P_b,) scores of bag b's positive instances; negatives[b]: (N_b,) of its negatives.
    """
    n_bags = len(positives)
    counts = np.zeros((n_bags, n_bags), dtype=np.float64)
    sizes = [p.size for p in positives]
    if sum(sizes) == 0:
        return counts
    pooled_positives = np.concatenate([np.asarray(p, dtype=np.float64) for p in positives])
    owner = np.repeat(np.arange(n_bags), sizes)  # which bag each pooled positive came from
    for b, negative in enumerate(negatives):
        if negative.size == 0:
            continue
        ordered = np.sort(np.asarray(negative, dtype=np.float64))
        below = np.searchsorted(ordered, pooled_positives, side="left")  # negatives strictly lower
        up_to = np.searchsorted(ordered, pooled_positives, side="right")  # ... lower or equal
        counts[:, b] = np.bincount(owner, weights=(below + up_to) / 2.0, minlength=n_bags)
    return counts


def pooled_auroc_weighted(counts: np.ndarray, n_pos: np.ndarray, n_neg: np.ndarray, weights) -> float | None:
    """The pooled AUROC of bags drawn with multiplicities `weights` (B,), from pair_counts()."""
    weights = np.asarray(weights, dtype=np.float64)
    total_pos, total_neg = float(weights @ n_pos), float(weights @ n_neg)
    if total_pos == 0 or total_neg == 0:
        return None
    return float(weights @ counts @ weights) / (total_pos * total_neg)
