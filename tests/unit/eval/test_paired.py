"""dsexit.eval.paired against printed t tables and hand-worked examples."""

import math

import pytest

from dsexit.eval.paired import (
    isotonic_non_increasing,
    student_t_cdf,
    student_t_quantile,
    t_interval,
    value_at,
)

# Two-sided 95% critical values t(0.975, df), as printed in any t table.
T_TABLE_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 9: 2.262, 10: 2.228, 29: 2.045}


@pytest.mark.parametrize("df, critical", sorted(T_TABLE_975.items()))
def test_t_quantile_matches_the_printed_table(df, critical):
    assert student_t_quantile(0.975, df) == pytest.approx(critical, abs=6e-4)
    assert student_t_quantile(0.025, df) == pytest.approx(-critical, abs=6e-4)


def test_t_cdf_matches_the_distributions_with_elementary_forms():
    # df = 1 is the Cauchy distribution: 1/2 + atan(t)/pi.
    for t in (-3.0, -0.5, 0.0, 1.0, 7.0):
        assert student_t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi)
    # df = 2: 1/2 + t / (2 sqrt(2 + t^2)).
    for t in (-2.0, 0.3, 1.0, 4.0):
        assert student_t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)))
    # df = 3: 1/2 + (1/pi) (atan(t/sqrt3) + sqrt3 t / (3 + t^2)).
    for t in (-1.5, 0.7, 2.5):
        expected = 0.5 + (math.atan(t / math.sqrt(3)) + math.sqrt(3) * t / (3 + t * t)) / math.pi
        assert student_t_cdf(t, 3) == pytest.approx(expected)
    # Large df tends to the normal: Phi(1.96) = 0.9750.
    assert student_t_cdf(1.959964, 2000) == pytest.approx(0.975, abs=2e-4)


def test_interval_of_five_values_by_hand():
    # mean 3, sample sd sqrt(2.5), se sqrt(2.5 / 5) = 0.70711; t(0.975, 4) = 2.7764 -> half width 1.9632
    summary = t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    assert summary["n"] == 5 and summary["mean"] == pytest.approx(3.0)
    assert summary["low"] == pytest.approx(3.0 - 1.9632, abs=2e-4)
    assert summary["high"] == pytest.approx(3.0 + 1.9632, abs=2e-4)
    assert summary["resolved"] is True


def test_interval_that_straddles_zero_is_not_resolved():
    # mean 0.1, sd sqrt(((-1.1)^2 + 0.9^2 + (-2.1)^2 + 1.9^2 + 0.4^2) / 4) = sqrt(10.2 / 4) = sqrt(2.55)
    summary = t_interval([-1.0, 1.0, -2.0, 2.0, 0.5])
    half = 2.7764 * math.sqrt(2.55) / math.sqrt(5)
    assert summary["low"] == pytest.approx(0.1 - half, abs=2e-4) and summary["high"] == pytest.approx(
        0.1 + half, abs=2e-4
    )
    assert summary["resolved"] is False


def test_fewer_seeds_than_the_minimum_give_a_mean_but_no_interval():
    summary = t_interval([1.0, 1.1, 0.9, 1.05])
    assert summary["mean"] == pytest.approx(1.0125)
    assert summary["low"] is None and summary["high"] is None and summary["resolved"] is False
    # The minimum is a policy, not a limit of the arithmetic: with min_n=2, two values give t(0.975, 1).
    pair = t_interval([1.0, 3.0], min_n=2)
    assert pair["high"] - pair["mean"] == pytest.approx(12.706, abs=1e-3)  # sd sqrt(2) / sqrt(n = 2) = 1


def test_isotonic_fit_pools_the_bumps_of_a_falling_curve():
    assert isotonic_non_increasing([0.40, 0.30, 0.32, 0.25]) == pytest.approx([0.40, 0.31, 0.31, 0.25])
    # a rise at the start pools with everything it violates: (1 + 3 + 2) / 3 = 2
    assert isotonic_non_increasing([1.0, 3.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])
    # (0.30 + 0.29 + 0.31 + 0.30) / 4 = 0.30 after 0.35; the final 0.28 stays
    assert isotonic_non_increasing([0.35, 0.30, 0.29, 0.31, 0.30, 0.28]) == pytest.approx(
        [0.35, 0.30, 0.30, 0.30, 0.30, 0.28]
    )
    falling = [0.5, 0.4, 0.4, 0.1]
    assert isotonic_non_increasing(falling) == falling


def test_value_at_interpolates_and_refuses_to_extrapolate():
    xs, ys = [0.0, 100.0, 200.0], [0.4, 0.3, 0.26]
    assert value_at(xs, ys, 150.0) == pytest.approx(0.28)
    assert value_at(xs, ys, 100.0) == pytest.approx(0.3)
    assert value_at(xs, ys, 0.0) == pytest.approx(0.4)
    with pytest.raises(ValueError, match="x=250"):
        value_at(xs, ys, 250.0)
