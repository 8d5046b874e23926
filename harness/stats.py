"""Seed statistics: one seed's result is one sample of a random variable, so a sweep over
seeds is summarised by mean, standard deviation and a 95% confidence interval, and two
configurations are compared with Welch's t interval for the difference of their means."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

# Two-sided 95% critical values of Student's t (0.975 quantile) by degrees of freedom.
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262, 10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131,
         16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086, 21: 2.080, 22: 2.074,
         23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048, 29: 2.045,
         30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}
Z_975 = 1.960


def t_critical(df: float) -> float:
    """0.975 quantile of t with `df` degrees of freedom, rounded down to a tabulated df
    (conservative: a smaller df gives a wider interval)."""
    if df < 1:
        raise ValueError("degrees of freedom must be >= 1")
    usable = [d for d in T_975 if d <= math.floor(df)]
    if math.floor(df) > 120:
        return Z_975
    return T_975[max(usable)]


@dataclass(frozen=True)
class Summary:
    n: int
    mean: float
    std: Optional[float]  # sample standard deviation (n - 1); None for one sample
    ci_low: Optional[float]
    ci_high: Optional[float]


def summarize(values: Sequence[float]) -> Summary:
    n = len(values)
    if n == 0:
        raise ValueError("no values to summarize")
    mean = math.fsum(values) / n
    if n == 1:
        return Summary(1, mean, None, None, None)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_critical(n - 1) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half)


@dataclass(frozen=True)
class Difference:
    diff: float  # mean(b) - mean(a)
    ci_low: Optional[float]
    ci_high: Optional[float]
    df: Optional[float]
    beyond_noise: bool  # the 95% interval of the difference excludes zero


def compare(a: Sequence[float], b: Sequence[float]) -> Difference:
    """Welch's interval for mean(b) - mean(a). Needs two samples on each side."""
    sa, sb = summarize(a), summarize(b)
    diff = sb.mean - sa.mean
    if sa.n < 2 or sb.n < 2:
        return Difference(diff, None, None, None, False)
    va, vb = sa.std ** 2 / sa.n, sb.std ** 2 / sb.n
    se = math.sqrt(va + vb)
    if se == 0:  # every seed gave the same value on both sides
        return Difference(diff, diff, diff, None, diff != 0)
    df = (va + vb) ** 2 / (va ** 2 / (sa.n - 1) + vb ** 2 / (sb.n - 1))
    half = t_critical(df) * se
    low, high = diff - half, diff + half
    return Difference(diff, low, high, df, low > 0 or high < 0)
