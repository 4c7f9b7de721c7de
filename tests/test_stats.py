"""smcli.stats: every hand-written statistic against scikit-learn or a brute-force definition."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn import metrics

from smcli import stats
from smcli.metrics import auroc

# Scores with many ties (few distinct values) and float32 values, labels with both classes.
scored_labels = st.integers(2, 60).flatmap(
    lambda n: st.tuples(
        st.lists(st.integers(0, 1), min_size=n, max_size=n).filter(lambda labels: 0 < sum(labels) < n),
        st.one_of(
            st.lists(st.integers(-3, 3).map(float), min_size=n, max_size=n),
            st.lists(st.floats(-1e6, 1e6, allow_nan=False, width=32), min_size=n, max_size=n),
        ),
    )
)


@settings(max_examples=200, deadline=None)
@given(scored_labels)
def test_bags_csv_auroc_equals_scikit_learn(case):
    """`_bags.csv`'s auroc (smcli.metrics.auroc, used by `score`) and evaluate's (scikit-learn)
    can never disagree: equal to 1e-12 on any scores, ties included."""
    labels, scores = np.array(case[0]), np.array(case[1], dtype=np.float32)
    assert auroc(scores, labels) == pytest.approx(metrics.roc_auc_score(labels, scores), abs=1e-12)
    assert stats.roc_auc(labels, scores) == pytest.approx(auroc(scores, labels), abs=1e-12)
    assert stats.fast_auroc(labels, scores) == auroc(scores, labels)


@settings(max_examples=200, deadline=None)
@given(scored_labels)
def test_fast_average_precision_equals_scikit_learn(case):
    labels, scores = np.array(case[0]), np.array(case[1], dtype=np.float64)
    expected = metrics.average_precision_score(labels, scores)
    assert stats.fast_average_precision(labels, scores) == pytest.approx(expected, abs=1e-12)
    assert stats.average_precision(labels, scores) == pytest.approx(expected, abs=1e-15)


def brute_force_delong(labels: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """DeLong, DeLong & Clarke-Pearson (1988) from the pairwise kernel, no ranks."""

    def components(scores):
        pos, neg = scores[labels == 1], scores[labels == 0]
        kernel = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
        return kernel.mean(), kernel.mean(axis=1), kernel.mean(axis=0)

    auc_a, v10_a, v01_a = components(a)
    auc_b, v10_b, v01_b = components(b)
    m, n = v10_a.size, v01_a.size
    var = (
        np.var(v10_a, ddof=1) / m
        + np.var(v01_a, ddof=1) / n
        + np.var(v10_b, ddof=1) / m
        + np.var(v01_b, ddof=1) / n
        - 2 * (np.cov(v10_a, v10_b)[0, 1] / m + np.cov(v01_a, v01_b)[0, 1] / n)
    )
    z = abs(auc_a - auc_b) / math.sqrt(var)
    return math.erfc(z / math.sqrt(2))


@pytest.mark.parametrize("seed", range(5))
def test_delong_equals_the_pairwise_definition(seed):
    rng = np.random.default_rng(seed)
    labels = np.r_[np.ones(15, dtype=int), np.zeros(22, dtype=int)]
    a = labels * 0.8 + rng.standard_normal(labels.size)
    b = np.round(labels * 0.3 + rng.standard_normal(labels.size), 1)  # ties
    p = stats.delong_test(labels, a, b)
    assert p == pytest.approx(brute_force_delong(labels, a, b), rel=1e-10)
    assert 0 < p < 1
    auc, _, _ = stats.delong_components(labels, b)
    assert auc == pytest.approx(metrics.roc_auc_score(labels, b), abs=1e-12)


def test_delong_identical_models_and_perfect_models():
    labels = np.array([1, 1, 0, 0, 0])
    scores = np.array([0.9, 0.4, 0.5, 0.1, 0.2])
    assert stats.delong_test(labels, scores, scores) == 1.0
    assert stats.delong_test(labels, np.array([0.9, 0.8, 0.1, 0.2, 0.3]), np.array([5, 4, 1, 2, 3.0])) == 1.0


def test_stratified_resamples_keep_the_class_counts_and_are_seeded():
    labels = np.array([1, 0, 0, 1, 0, 0, 0])
    rows = stats.stratified_resamples(labels, 50, seed=3)
    assert rows.shape == (50, 7)
    assert (labels[rows].sum(axis=1) == 2).all()
    assert (stats.stratified_resamples(labels, 50, seed=3) == rows).all()
    assert not (stats.stratified_resamples(labels, 50, seed=4) == rows).all()


def test_youden_threshold_separates_and_calls_at_or_above():
    labels = np.array([0, 0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.35, 0.3, 0.8, 0.9])
    threshold = stats.youden_threshold(labels, scores)
    assert threshold == 0.8  # J = 2/3 at 0.8 (tie with 0.3 broken to the higher threshold)
    assert stats.threshold_metrics(labels, scores, threshold) == {
        "balanced_accuracy": pytest.approx(5 / 6),
        "sensitivity": pytest.approx(2 / 3),
        "specificity": 1.0,
    }


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 6), st.integers(0, 6)).map(lambda t: t if sum(t) else (1, 0)),
        min_size=1,
        max_size=6,
    ),
    st.integers(0, 2**32 - 1),
)
def test_pooled_auroc_by_pair_counts_equals_concatenation(sizes, seed):
    """The bag-bootstrap of the pooled AUROC: wᵀCw / (P N) equals scikit-learn on the drawn bags'
    instances concatenated, for any draw (repeats included)."""
    rng = np.random.default_rng(seed)
    positives = [rng.integers(0, 5, p).astype(float) for p, _ in sizes]  # ties across bags
    negatives = [rng.integers(0, 5, n).astype(float) for _, n in sizes]
    counts = stats.pair_counts(positives, negatives)
    n_pos = np.array([p.size for p in positives], dtype=float)
    n_neg = np.array([n.size for n in negatives], dtype=float)
    draw = rng.integers(0, len(sizes), len(sizes))
    weights = np.bincount(draw, minlength=len(sizes))
    scores = np.concatenate([np.r_[positives[b], negatives[b]] for b in draw])
    labels = np.concatenate([np.r_[np.ones(positives[b].size), np.zeros(negatives[b].size)] for b in draw])
    expected = metrics.roc_auc_score(labels, scores) if 0 < labels.sum() < labels.size else None
    got = stats.pooled_auroc_weighted(counts, n_pos, n_neg, weights)
    assert got == (None if expected is None else pytest.approx(expected, abs=1e-12))


def test_sign_flip_is_exact_for_few_bags():
    assert stats.sign_flip_test(np.array([0.1, 0.05, 0.2, 0.08]), 1000, 0) == pytest.approx(2 / 16)
    assert stats.sign_flip_test(np.array([0.1, -0.1]), 1000, 0) == 1.0
    many = np.full(30, 0.05)
    assert stats.sign_flip_test(many, 999, 0) == pytest.approx(1 / 1000)


def test_percentile_interval_leaves_undefined_draws_out():
    assert stats.percentile_interval([None, None]) == (None, None)
    low, high = stats.percentile_interval([None] + [float(v) for v in range(101)])
    assert (low, high) == (pytest.approx(2.5), pytest.approx(97.5))
