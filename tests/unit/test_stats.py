"""Paired comparisons: values checked against hand counts and scipy-free closed forms."""

import math

import numpy as np
import pytest

from pipeline.stats import accuracy_interval, mcnemar_exact_p, paired_difference


def test_paired_difference_counts_discordant_images():
    ref = np.array([1, 1, 1, 1, 0, 0, 1, 1, 1, 1], bool)
    cand = np.array([1, 1, 0, 1, 1, 1, 1, 0, 1, 1], bool)  # loses 2, wins 2
    d = paired_difference(cand, ref)
    assert d.difference == 0.0
    assert (d.n_images, d.n_disagree, d.candidate_only, d.reference_only) == (10, 4, 2, 2)
    assert d.mcnemar_p == 1.0
    assert d.low < 0 < d.high


def test_identical_models_have_a_zero_width_interval():
    correct = np.random.default_rng(0).random(300) < 0.9
    d = paired_difference(correct, correct)
    assert (d.difference, d.low, d.high, d.n_disagree) == (0.0, 0.0, 0.0, 0)


def test_interval_is_seeded_and_covers_the_point_estimate():
    rng = np.random.default_rng(1)
    ref = rng.random(270) < 0.95
    cand = ref.copy()
    cand[:12] = ~cand[:12]
    a, b = paired_difference(cand, ref, seed=3), paired_difference(cand, ref, seed=3)
    assert a == b
    assert a.low <= a.difference <= a.high
    # 12 discordant images of 270: the interval's half-width is close to the normal one
    half = 1.96 * math.sqrt(a.n_disagree / 270 - a.difference**2) / math.sqrt(270)
    assert (a.high - a.low) / 2 == pytest.approx(half, rel=0.2)


def test_a_clear_loss_has_an_interval_below_zero():
    ref = np.ones(200, bool)
    cand = ref.copy()
    cand[:20] = False
    d = paired_difference(cand, ref)
    assert d.difference == pytest.approx(-0.1)
    assert d.high < 0
    assert d.mcnemar_p == pytest.approx(2 * 0.5**20)


def test_mcnemar_exact_matches_the_binomial_tail():
    # 1 vs 7 discordant: 2 * P(X <= 1), X ~ Bin(8, 1/2) = 2 * 9/256
    assert mcnemar_exact_p(1, 7) == pytest.approx(18 / 256)
    assert mcnemar_exact_p(7, 1) == mcnemar_exact_p(1, 7)
    assert mcnemar_exact_p(0, 0) == 1.0


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="equal"):
        paired_difference(np.ones(3, bool), np.ones(4, bool))
    with pytest.raises(ValueError, match="non-empty"):
        paired_difference(np.ones(0, bool), np.ones(0, bool))


def test_wilson_interval_values():
    low, high = accuracy_interval(np.array([True] * 90 + [False] * 10))
    assert (low, high) == pytest.approx((0.8256, 0.9448), abs=1e-3)
    low, high = accuracy_interval(np.ones(50, bool))
    assert high == 1.0 and low == pytest.approx(0.9287, abs=1e-3)
