"""The Hoeffding-Bentkus bound a tolerance is certified with."""

import math
import random

import pytest

from dyncompile.plan import bound


def test_p_value_is_one_when_the_mean_reaches_the_tolerance():
    assert bound.p_value(0.1, 1000, 0.1) == 1.0
    assert bound.p_value(0.2, 1000, 0.1) == 1.0


def test_p_value_falls_with_rows_and_with_the_margin():
    assert bound.p_value(0.05, 400, 0.1) < bound.p_value(0.05, 100, 0.1)
    assert bound.p_value(0.01, 200, 0.1) < bound.p_value(0.05, 200, 0.1)


def test_zero_loss_needs_the_hoeffding_number_of_rows():
    # at mean 0 Hoeffding's kl exponent gives (1 - t)^n <= delta
    t, delta = 0.05, 0.1
    n = bound.rows_needed(t, delta)
    assert n == math.ceil(math.log(delta) / math.log(1 - t))
    assert bound.p_value(0.0, n, t) <= delta < bound.p_value(0.0, n - 1, t)


def test_upper_bound_is_above_the_mean_and_tightens_with_rows():
    small, large = bound.upper_bound(0.05, 100, 0.1), bound.upper_bound(0.05, 10000, 0.1)
    assert 0.05 < large < small < 1.0
    assert bound.p_value(0.05, 100, small) <= 0.1 + 1e-9
    assert bound.upper_bound(0.0, 3, 0.1) > 0.5  # three rows bound little
    assert bound.upper_bound(0.0, 1, 0.01) > 0.98


@pytest.mark.parametrize("true_mean", [0.02, 0.06])
def test_bound_covers_the_true_mean_at_its_confidence(true_mean):
    rng = random.Random(0)
    misses, trials = 0, 300
    for _ in range(trials):
        losses = [1.0 if rng.random() < true_mean else 0.0 for _ in range(200)]
        if bound.upper_bound(sum(losses) / 200, 200, 0.1) < true_mean:
            misses += 1
    assert misses / trials <= 0.1
