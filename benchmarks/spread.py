"""Helpers shared by the benchmarks: interleaved pairs and the spread of samples.

On a shared machine the load changes while a benchmark runs, so a comparison of two things
is made in pairs run back to back (the order alternating from pair to pair), one ratio per
pair, and reported as the median of those ratios with their spread. A single difference of
two totals, or a ratio of two totals measured minutes apart, is not reported.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable


def interleave(first: Callable, second: Callable, pairs: int) -> tuple[list, list]:
    """Run `first` and `second` `pairs` times each, back to back, alternating which goes
    first (so that a drift in load or a warm cache does not favour one side)."""
    a, b = [], []
    for i in range(pairs):
        if i % 2 == 0:
            a.append(first())
            b.append(second())
        else:
            b.append(second())
            a.append(first())
    return a, b


def summary(samples: Iterable[float], digits: int = 4) -> dict:
    """Median, quartiles, min, max and count of some samples."""
    ordered = sorted(samples)
    if len(ordered) > 1:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1 = q3 = ordered[0]
    return {"median": round(statistics.median(ordered), digits),
            "q1": round(q1, digits), "q3": round(q3, digits),
            "min": round(ordered[0], digits), "max": round(ordered[-1], digits),
            "n": len(ordered)}


def paired_ratios(numerators: list[float], denominators: list[float]) -> list[float]:
    return [n / d for n, d in zip(numerators, denominators)]


def timed(call: Callable, repeat: int) -> list[float]:
    """Seconds taken by each of `repeat` calls of `call` (after one untimed warm-up call)."""
    call()
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    return samples
