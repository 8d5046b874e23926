"""Seed-sweep statistics (harness/record/stats.py), checked against exact values."""

import math

import pytest

from harness.record import stats


def test_summary_statistics_are_exact():
    s = stats.summarize([0.90, 0.92, 0.94])
    assert s.n == 3
    assert s.mean == pytest.approx(0.92, abs=1e-15)
    assert s.std == pytest.approx(0.02, abs=1e-15)
    t = (2 * 0.975 - 1) / math.sqrt(2 * 0.975 * 0.025)  # t(0.975, df=2), closed form
    half = t * 0.02 / math.sqrt(3)
    assert s.ci_low == pytest.approx(0.92 - half, abs=1e-11)
    assert s.ci_high == pytest.approx(0.92 + half, abs=1e-11)
    single = stats.summarize([0.5])
    assert (single.n, single.mean, single.std, single.ci_low) == (1, 0.5, None, None)


def test_welch_difference_is_exact_and_judged_against_noise():
    a, b = [1.0, 2.0, 3.0, 4.0], [3.0, 4.0, 5.0, 6.0]
    d = stats.compare(a, b)
    var = 5.0 / 3.0  # sample variance of both sides
    se = math.sqrt(var / 4 + var / 4)
    df = (2 * var / 4) ** 2 / (2 * (var / 4) ** 2 / 3)  # = 6
    assert d.df == pytest.approx(df) and d.df == pytest.approx(6.0)
    assert d.diff == 2.0
    assert d.ci_low == pytest.approx(2.0 - 2.446912 * se)
    assert d.ci_high == pytest.approx(2.0 + 2.446912 * se)
    assert d.beyond_noise is False  # [-0.23, 4.23] contains 0
    far = stats.compare([1.0, 1.1, 0.9], [5.0, 5.1, 4.9])
    assert far.beyond_noise is True


def test_t_critical_is_exact_for_any_degrees_of_freedom():
    """Against closed forms (df 1: tan(pi (p - 1/2)); df 2: (2p - 1) / sqrt(2p(1 - p))),
    published 0.975 quantiles, the normal limit, and Welch's fractional df."""
    import math

    p = 0.975
    assert stats.t_critical(1) == pytest.approx(math.tan(math.pi * (p - 0.5)), abs=1e-9)
    assert stats.t_critical(2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)),
                                                abs=1e-9)
    published = {3: 3.182446, 5: 2.570582, 10: 2.228139, 30: 2.042272, 45: 2.014103,
                 120: 1.979930}
    for df, value in published.items():
        assert stats.t_critical(df) == pytest.approx(value, abs=1e-6), df
    assert stats.t_critical(1e7) == pytest.approx(1.959964, abs=1e-6)
    assert stats.t_critical(2) > stats.t_critical(2.9) > stats.t_critical(3)
    with pytest.raises(ValueError):
        stats.t_critical(0.5)


def test_probability_that_b_beats_a_over_seeds():
    """Bouthillier et al.'s P(A>B): share of seed pairs, ties half, bootstrap interval."""
    clear = stats.probability_of_improvement([0.80, 0.81, 0.82], [0.90, 0.91, 0.92])
    assert (clear.p, clear.ci_low, clear.ci_high, clear.beyond_noise) == (1.0, 1.0, 1.0, True)
    same = stats.probability_of_improvement([0.80, 0.81, 0.82], [0.80, 0.81, 0.82])
    assert same.p == 0.5 and same.ci_low < 0.5 < same.ci_high and not same.beyond_noise
    lower_loss = stats.probability_of_improvement([0.5, 0.6], [0.3, 0.4],
                                                  higher_is_better=False)
    assert lower_loss.p == 1.0
    mixed = stats.probability_of_improvement([1, 3], [2, 4])  # b wins 3 of 4 pairs
    assert mixed.p == 0.75
    assert stats.probability_of_improvement([1, 3], [2, 4]) == mixed  # fixed generator
