"""smcli.metrics.auroc: a hand-worked example, a brute-force property test, and edge cases."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smcli.metrics import auroc


def brute_force_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Sum over (positive, negative) pairs of 1[s_p > s_n] + 0.5 * 1[s_p == s_n], / (n_pos n_neg)."""
    pos = scores[labels == 1]
    neg = scores[labels == 0]
    total = 0.0
    for sp in pos:
        for sn in neg:
            total += 1.0 if sp > sn else 0.5 if sp == sn else 0.0
    return total / (len(pos) * len(neg))


def test_hand_worked_example_with_ties():
    # scores: 0.1  0.4  0.35  0.8  0.4  0.1
    # labels:  0    0    1     1    1    0
    # positives {0.35, 0.8, 0.4}, negatives {0.1, 0.4, 0.1}; pairs (positive vs each negative):
    #   0.35: > 0.1, < 0.4, > 0.1          -> 1 + 0 + 1   = 2
    #   0.8 : > 0.1, > 0.4, > 0.1          -> 1 + 1 + 1   = 3
    #   0.4 : > 0.1, = 0.4, > 0.1          -> 1 + 0.5 + 1 = 2.5
    #   total 7.5 over 3 * 3 = 9 pairs     -> AUC = 7.5 / 9 = 5 / 6
    # Same by ranks: sorted 0.1 0.1 | 0.35 | 0.4 0.4 | 0.8 have average ranks 1.5 1.5 | 3 | 4.5 4.5 | 6;
    # positive rank sum R = 3 + 6 + 4.5 = 13.5, U = R - 3 * 4 / 2 = 7.5, AUC = U / 9 = 5 / 6.
    scores = np.array([0.1, 0.4, 0.35, 0.8, 0.4, 0.1])
    labels = np.array([0, 0, 1, 1, 1, 0])
    assert auroc(scores, labels) == pytest.approx(5 / 6, abs=1e-15)
    assert brute_force_auroc(scores, labels) == pytest.approx(5 / 6, abs=1e-15)


def test_perfect_reversed_and_all_tied():
    labels = np.array([0, 0, 1, 1])
    assert auroc(np.array([1.0, 2.0, 3.0, 4.0]), labels) == 1.0
    assert auroc(np.array([4.0, 3.0, 2.0, 1.0]), labels) == 0.0
    assert auroc(np.zeros(4), labels) == 0.5


def test_one_class_is_none():
    assert auroc(np.array([0.3, 0.1, 0.2]), np.array([0, 0, 0])) is None
    assert auroc(np.array([0.3, 0.1, 0.2]), np.array([1, 1, 1])) is None
    assert auroc(np.array([0.3]), np.array([1])) is None
    assert auroc(np.array([]), np.array([], dtype=np.int64)) is None


def test_accepts_bool_and_integer_label_dtypes():
    scores = np.array([0.2, 0.9, 0.5, 0.1])
    expected = auroc(scores, np.array([0, 1, 1, 0]))
    assert auroc(scores, np.array([False, True, True, False])) == expected
    assert auroc(scores, np.array([0, 1, 1, 0], dtype=np.uint8)) == expected
    assert auroc(scores.astype(np.float16), np.array([0, 1, 1, 0], dtype=np.int8)) == expected


def test_rejects_bad_input():
    with pytest.raises(ValueError):
        auroc(np.array([0.1, 0.2]), np.array([0, 1, 1]))
    with pytest.raises(ValueError):
        auroc(np.array([0.1, 0.2]), np.array([0, 2]))
    with pytest.raises(ValueError):
        auroc(np.array([0.1, np.nan]), np.array([0, 1]))


labelled_scores = st.integers(min_value=2, max_value=60).flatmap(
    lambda n: st.tuples(
        st.lists(st.integers(min_value=-3, max_value=3), min_size=n, max_size=n),  # many ties
        st.lists(st.integers(min_value=0, max_value=1), min_size=n, max_size=n),
    )
)


@settings(max_examples=300, deadline=None)
@given(labelled_scores)
def test_matches_brute_force_pair_count(data):
    scores = np.array(data[0], dtype=np.float64)
    labels = np.array(data[1], dtype=np.int64)
    result = auroc(scores, labels)
    if labels.min() == labels.max():
        assert result is None
    else:
        assert result == pytest.approx(brute_force_auroc(scores, labels), abs=1e-12)


@settings(max_examples=200, deadline=None)
@given(labelled_scores, st.sampled_from(["exp", "cube", "affine", "arctan"]))
def test_invariant_to_strictly_increasing_transforms(data, transform):
    scores = np.array(data[0], dtype=np.float64)
    labels = np.array(data[1], dtype=np.int64)
    functions = {
        "exp": np.exp,
        "cube": lambda x: x**3,
        "affine": lambda x: 2.5 * x - 7.0,
        "arctan": np.arctan,
    }
    assert auroc(functions[transform](scores), labels) == auroc(scores, labels)


def test_large_input_is_fast_and_bounded():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200_000)
    scores = rng.normal(size=200_000) + labels  # d' = 1: AUC = Phi(1 / sqrt 2) ~ 0.760
    value = auroc(scores, labels)
    assert 0.75 < value < 0.77
