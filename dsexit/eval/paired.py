"""Comparing training arms paired by seed: Student-t intervals, monotone smoothing, matched points.

The benchmarks that pit an arm against a baseline run both under the same seeds (the same
initial weights and data order), so the per-seed difference removes what the seeds share, and
the spread of those differences is what decides whether a difference is resolved. Pure Python,
no SciPy: the t distribution below uses its closed form for integer degrees of freedom.
"""

from __future__ import annotations

import math
import statistics
from bisect import bisect_left
from collections.abc import Sequence

# Two or three seeds give an interval, but one so wide (t = 12.7 or 4.3) and with a standard
# deviation so poorly estimated that it says little; below this many, no interval is reported.
MIN_SEEDS_FOR_INTERVAL = 5


def student_t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with `df` (a positive integer) degrees of freedom.

    Closed form (Abramowitz & Stegun 26.7.3/26.7.4): with theta = atan(t / sqrt(df)), a finite
    series in cos(theta)^2 whose length grows with df.
    """
    if df < 1 or int(df) != df:
        raise ValueError(f"df={df} is invalid; expected a positive integer number of degrees of freedom.")
    theta = math.atan(t / math.sqrt(df))
    cos2 = math.cos(theta) ** 2
    if df % 2 == 1:
        # 2/pi * (theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ...)), terms up to cos^(df-3)
        term, series = 1.0, 0.0
        for k in range(1, df - 1, 2):
            series += term
            term *= cos2 * (k + 1) / (k + 2)
        area = (2 / math.pi) * (theta + (math.sin(theta) * math.cos(theta) * series if df > 1 else 0.0))
    else:
        # sin * (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...), terms up to cos^(df-2)
        term, series = 1.0, 0.0
        for k in range(0, df - 1, 2):
            series += term
            term *= cos2 * (k + 1) / (k + 2)
        area = math.sin(theta) * series
    return 0.5 + 0.5 * area


def student_t_quantile(probability: float, df: int) -> float:
    """The t with P(T <= t) = `probability`, by bisection on the CDF (monotone, so it converges)."""
    if not 0.0 < probability < 1.0:
        raise ValueError(f"probability={probability} is invalid; expected a value strictly between 0 and 1.")
    low, high = -1.0, 1.0
    while student_t_cdf(low, df) > probability:
        low *= 2
    while student_t_cdf(high, df) < probability:
        high *= 2
    for _ in range(200):
        middle = (low + high) / 2
        if student_t_cdf(middle, df) < probability:
            low = middle
        else:
            high = middle
        if high - low < 1e-12 * max(1.0, abs(middle)):
            break
    return (low + high) / 2


def t_interval(values: Sequence[float], confidence: float = 0.95, min_n: int = MIN_SEEDS_FOR_INTERVAL) -> dict:
    """Mean of `values` with its two-sided Student-t interval; `low`/`high` are None below `min_n`.

    `resolved` says whether the interval excludes zero (False when there is no interval).
    """
    values = [float(value) for value in values]
    n = len(values)
    mean = statistics.fmean(values) if values else float("nan")
    summary = {"n": n, "mean": mean, "low": None, "high": None, "resolved": False, "values": values}
    if n < max(min_n, 2):
        return summary
    half_width = student_t_quantile(0.5 + confidence / 2, n - 1) * statistics.stdev(values) / math.sqrt(n)
    summary.update(low=mean - half_width, high=mean + half_width)
    summary["resolved"] = summary["low"] > 0 or summary["high"] < 0
    return summary


def isotonic_non_increasing(values: Sequence[float]) -> list[float]:
    """The least-squares non-increasing fit to `values` (pool adjacent violators, equal weights).

    A held-out loss curve is noisy from one evaluation to the next; its monotone fit keeps the
    trend and pools the bumps, so "first time the loss reaches X" no longer hinges on one lucky dip.
    """
    blocks: list[list[float]] = []  # [mean, count] of pooled runs, left to right
    for value in values:
        blocks.append([float(value), 1])
        while len(blocks) > 1 and blocks[-2][0] < blocks[-1][0]:
            mean, count = blocks.pop()
            previous_mean, previous_count = blocks[-1]
            total = previous_count + count
            blocks[-1] = [(previous_mean * previous_count + mean * count) / total, total]
    return [mean for mean, count in blocks for _ in range(count)]


def value_at(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """The piecewise-linear curve through (xs, ys) at `x` (xs increasing; x within their range)."""
    if not xs or not xs[0] <= x <= xs[-1]:
        raise ValueError(f"x={x} is outside the curve's range [{xs[0] if xs else None}, {xs[-1] if xs else None}].")
    index = bisect_left(xs, x)
    if xs[index] == x:
        return float(ys[index])
    x0, x1, y0, y1 = xs[index - 1], xs[index], ys[index - 1], ys[index]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
