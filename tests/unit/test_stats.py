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


# scipy (installed with scikit-learn) is the independent reference for the closed forms
@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
@pytest.mark.parametrize(("hits", "n"), [(90, 100), (1, 1), (0, 7), (16, 16), (250, 270)])
def test_wilson_interval_equals_scipy(hits, n, confidence):
    from scipy.stats import binomtest

    correct = np.array([True] * hits + [False] * (n - hits))
    expected = binomtest(hits, n).proportion_ci(confidence, method="wilson")
    low, high = accuracy_interval(correct, confidence)
    assert (low, high) == pytest.approx((expected.low, expected.high), abs=1e-9)
    assert 0.0 <= low <= high <= 1.0


def test_wilson_bounds_are_clipped_to_zero_and_one():
    # in floating point the formula gives 1 + 2e-16 for 9 of 9, and -1e-17 for 0 of 21
    assert accuracy_interval(np.ones(9, bool))[1] == 1.0
    assert accuracy_interval(np.zeros(21, bool))[0] == 0.0
    with pytest.raises(ValueError, match="^accuracy_interval: no images$"):
        accuracy_interval(np.ones(0, bool))


@pytest.mark.parametrize(("a", "b"), [(2, 5), (0, 5), (1, 0), (3, 3), (10, 30), (0, 1)])
def test_mcnemar_equals_scipy_binomial_test(a, b):
    from scipy.stats import binomtest

    assert mcnemar_exact_p(a, b) == pytest.approx(binomtest(a, a + b, 0.5).pvalue, rel=1e-12)


def test_default_seed_is_zero_and_the_seed_matters():
    rng = np.random.default_rng(2)
    ref = rng.random(120) < 0.8
    cand = ref.copy()
    cand[:15] = ~cand[:15]
    default = paired_difference(cand, ref, samples=200)
    assert default == paired_difference(cand, ref, samples=200, seed=0)
    other = paired_difference(cand, ref, samples=200, seed=1)
    assert (default.low, default.high) != (other.low, other.high)


def test_every_image_can_be_drawn_by_the_bootstrap():
    ref = np.ones(10, bool)
    cand = ref.copy()
    cand[0] = False  # the first image alone decides
    d = paired_difference(cand, ref)
    assert d.difference == pytest.approx(-0.1)
    assert d.low <= -0.1 and d.high == 0.0


def test_interval_width_follows_the_confidence():
    """Many images and draws: the bootstrap interval is the normal one within a few %."""
    rng = np.random.default_rng(4)
    ref = rng.random(1000) < 0.9
    cand = ref.copy()
    cand[:100] = ~cand[:100]
    for confidence, z in [(0.95, 1.959964), (0.8, 1.281552)]:
        d = paired_difference(cand, ref, samples=20000, confidence=confidence)
        sd = math.sqrt(d.n_disagree / 1000 - d.difference**2) / math.sqrt(1000)
        assert (d.high - d.low) / 2 == pytest.approx(z * sd, rel=0.05), confidence
        assert (d.high + d.low) / 2 == pytest.approx(d.difference, abs=0.2 * z * sd)


def test_bad_shape_message_names_both_shapes():
    with pytest.raises(ValueError) as info:
        paired_difference(np.ones((2, 2), bool), np.ones((2, 2), bool))
    assert str(info.value) == (
        "paired_difference: got shapes (2, 2) and (2, 2); expected two equal, non-empty 1-d "
        "arrays (one entry per image)"
    )


def test_record_and_describe():
    ref = np.array([True, False, False])
    d = paired_difference(np.ones(3, bool), ref)  # wins 2 of 3 images
    assert d.record("pruned_") == {
        "pruned_difference": 0.666667,
        "pruned_low": round(d.low, 6),
        "pruned_high": round(d.high, 6),
        "pruned_n_images": 3,
        "pruned_n_disagree": 2,
        "pruned_candidate_only": 2,
        "pruned_reference_only": 0,
        "pruned_mcnemar_p": 0.5,
    }
    assert d.record()["difference"] == 0.666667 and d.record()["n_images"] == 3
    assert isinstance(d.record()["n_images"], int)
    same = paired_difference(ref, ref)
    assert same.describe() == "+0.00 points [+0.00, +0.00] 95% CI, 0 of 3 images disagree"
    loss = paired_difference(np.zeros(4, bool), np.array([True, True, False, False]))
    assert (loss.low, loss.high) == (-1.0, 0.0)  # 4 images: the bootstrap reaches both ends
    assert loss.describe() == "-50.00 points [-100.00, +0.00] 95% CI, 2 of 4 images disagree"
    ref = np.ones(200, bool)
    cand = ref.copy()
    cand[:7] = False
    small = paired_difference(cand, ref)  # -3.5 points, an interval of non-round bounds
    low, high = f"{100 * small.low:+.2f}", f"{100 * small.high:+.2f}"
    assert (low, high) == ("-6.50", "-1.00")
    assert small.describe() == f"-3.50 points [{low}, {high}] 95% CI, 7 of 200 images disagree"
