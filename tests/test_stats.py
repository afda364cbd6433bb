"""Intervals and paired tests: hand-checked numbers, then how rows and rankings use them."""

from __future__ import annotations

import numpy as np
import pytest

from quantlab import stats


# --- Wilson ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("successes, trials, low, high", [
    (0, 10, 0.0, 0.2775),        # z^2/(n + z^2) = 3.8415 / 13.8415
    (5, 10, 0.2366, 0.7634),
    (450, 450, 0.9915, 1.0),     # n / (n + z^2) = 450 / 453.8415
    (400, 450, 0.8565, 0.9147),
])
def test_wilson_bounds_for_known_counts(successes, trials, low, high):
    interval = stats.wilson_interval(successes, trials)
    assert interval.low == pytest.approx(low, abs=5e-5)
    assert interval.high == pytest.approx(high, abs=5e-5)


def test_wilson_refuses_an_empty_split():
    with pytest.raises(ValueError, match="non-empty test split"):
        stats.wilson_interval(0, 0)


def test_one_sample_of_450_is_inside_the_interval():
    measured, one_more = stats.proportion_interval(430 / 450, 450), 431 / 450
    assert measured.contains(one_more)
    assert measured.width > 0.03  # about ±1.9 points at 95% accuracy on 450 samples


# --- McNemar --------------------------------------------------------------------------------------

def test_mcnemar_exact_p_for_known_discordant_pairs():
    assert stats.mcnemar_p(0, 5) == pytest.approx(0.0625)           # 2 / 2^5
    assert stats.mcnemar_p(1, 9) == pytest.approx(22 / 1024)        # 2 * (1 + 10) / 2^10
    assert stats.mcnemar_p(9, 1) == stats.mcnemar_p(1, 9)
    assert stats.mcnemar_p(5, 5) == 1.0


def test_identical_predictions_give_p_one():
    correct = np.array([True] * 430 + [False] * 20)
    assert stats.paired_mcnemar_p(correct, correct.copy()) == 1.0
    assert stats.paired_difference_interval(correct, correct).to_list() == [0.0, 0.0]


def test_losing_five_points_on_450_samples_is_significant():
    rng = np.random.default_rng(0)
    baseline = np.array([True] * 430 + [False] * 20)
    rng.shuffle(baseline)
    variant = baseline.copy()
    right = np.flatnonzero(baseline)
    wrong = np.flatnonzero(~baseline)
    variant[right[:28]] = False     # 28 samples lost
    variant[wrong[:5]] = True       # 5 gained: net -23 samples = -5.1 points
    assert (variant.mean() - baseline.mean()) * 100 < -5
    assert stats.paired_mcnemar_p(baseline, variant) < 0.01
    assert stats.paired_difference_interval(baseline, variant).high < 0


def test_one_sample_difference_is_noise():
    baseline = np.array([True] * 430 + [False] * 20)
    variant = baseline.copy()
    variant[0] = False              # -0.22 points
    p = stats.paired_mcnemar_p(baseline, variant)
    assert p == 1.0
    assert stats.within_noise(None, None, p_value=p)


def test_pairing_different_splits_is_refused():
    with pytest.raises(ValueError, match="same test split"):
        stats.discordant_pairs([True, False], [True])


# --- bootstrap of the median ----------------------------------------------------------------------

def test_bootstrap_interval_contains_the_median_and_is_deterministic():
    timings = np.random.default_rng(1).lognormal(mean=-3, sigma=0.2, size=200)
    interval = stats.bootstrap_median_interval(timings)
    assert interval.contains(float(np.median(timings)))
    assert stats.bootstrap_median_interval(timings) == interval


def test_bootstrap_interval_narrows_with_more_runs():
    rng = np.random.default_rng(2)
    few = stats.bootstrap_median_interval(rng.lognormal(-3, 0.3, size=50))
    many = stats.bootstrap_median_interval(rng.lognormal(-3, 0.3, size=1000))
    assert many.width < few.width / 2


def test_overlap_and_noise():
    assert stats.intervals_overlap([0.0062, 0.0071], [0.0066, 0.0075])
    assert not stats.intervals_overlap([0.0062, 0.0065], [0.0066, 0.0075])
    assert not stats.intervals_overlap(None, [0.0, 1.0])
    assert stats.within_noise([1, 2], [3, 4], p_value=0.3)
    assert not stats.within_noise([1, 2], [1.5, 4], p_value=0.001)


# --- latency modes --------------------------------------------------------------------------------

def test_a_machine_switching_speeds_gives_a_bimodal_distribution():
    rng = np.random.default_rng(3)
    two_speeds = np.concatenate([rng.normal(0.010, 0.0004, 300), rng.normal(0.015, 0.0005, 200)])
    modes = stats.latency_modes(two_speeds)
    assert modes.bimodal
    assert modes.fast_ms == pytest.approx(0.010, abs=5e-4)
    assert modes.slow_ms == pytest.approx(0.015, abs=5e-4)
    assert "bimodal" in modes.describe()


def test_one_speed_with_a_slow_tail_is_not_bimodal():
    rng = np.random.default_rng(4)
    assert not stats.latency_modes(rng.lognormal(-4.6, 0.15, 500)).bimodal
    assert not stats.latency_modes([0.01] * 100).bimodal
