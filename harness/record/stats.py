"""Seed statistics: one seed's result is one sample of a random variable, so a sweep over
seeds is summarised by mean, standard deviation and a 95% confidence interval, and two
configurations are compared with Welch's t interval for the difference of their means."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence


def t_critical(df: float) -> float:
    """0.975 quantile of Student's t with `df` degrees of freedom (any real df >= 1, as
    Welch's approximation gives): the two-sided 95 % critical value, exact to 1e-9."""
    if df < 1:
        raise ValueError("degrees of freedom must be >= 1")
    return t_quantile(0.975, df)


def t_quantile(p: float, df: float) -> float:
    """The p quantile (0.5 <= p < 1) of Student's t: the CDF inverted by bisection."""
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        high *= 2
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if t_cdf(middle, df) < p else (low, middle)
        if high - low < 1e-12:
            break
    return (low + high) / 2


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for t >= 0: 1 - I_x(df/2, 1/2) / 2 with x = df / (df + t^2)."""
    return 1.0 - 0.5 * regularized_beta(df / (df + t * t), df / 2, 0.5)


def regularized_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b), the regularized incomplete beta function, by its continued fraction
    (modified Lentz), on the side where it converges fast."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return math.exp(log_front) * _beta_fraction(x, a, b) / a
    return 1.0 - math.exp(log_front) * _beta_fraction(1 - x, b, a) / b


def _beta_fraction(x: float, a: float, b: float) -> float:
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return result


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


@dataclass(frozen=True)
class Improvement:
    p: float  # P(a seed of b does better than a seed of a); ties count half
    ci_low: float
    ci_high: float
    beyond_noise: bool  # the 95% interval excludes 0.5


def probability_of_improvement(a: Sequence[float], b: Sequence[float],
                               higher_is_better: bool = True, resamples: int = 2000,
                               seed: int = 0) -> Improvement:
    """P(B > A) over seeds (Bouthillier et al. 2021, "Accounting for variance in machine
    learning benchmarks"): the share of (seed of A, seed of B) pairs where B's result is
    better, ties counting half, with a 95% percentile bootstrap interval (resampling each
    side's seeds; a fixed generator, so the same results always give the same interval).
    An interval that contains 0.5 means the difference is inside the seed noise."""
    import random

    def share(xs: Sequence[float], ys: Sequence[float]) -> float:
        sign = 1.0 if higher_is_better else -1.0
        wins = sum(1.0 if sign * (y - x) > 0 else 0.5 if y == x else 0.0
                   for x in xs for y in ys)
        return wins / (len(xs) * len(ys))

    if not a or not b:
        raise ValueError("both sides need at least one result")
    generator = random.Random(seed)
    boot = sorted(share(generator.choices(a, k=len(a)), generator.choices(b, k=len(b)))
                  for _ in range(resamples))
    low, high = boot[int(0.025 * resamples)], boot[int(0.975 * resamples) - 1]
    return Improvement(share(a, b), low, high, low > 0.5 or high < 0.5)
