"""Latency percentiles shared by the bench tools.

``percentiles`` takes durations in **seconds** and returns a dict with keys
``p50``, ``p95``, ``p99`` and ``max`` in **milliseconds**, rounded to 3
decimals.  An empty input gives zeros for every key.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

__all__ = ["PERCENTILE_KEYS", "percentiles", "quantile", "quantile_shift"]

PERCENTILE_KEYS: tuple[str, ...] = ("p50", "p95", "p99", "max")


def quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile (same as numpy's default) of sorted values."""
    n = len(sorted_values)
    if n == 0:
        return 0.0
    if n == 1:
        return float(sorted_values[0])
    pos = (n - 1) * min(max(q, 0.0), 1.0)
    lo = math.floor(pos)
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    return float(sorted_values[lo]) + (float(sorted_values[hi]) - float(sorted_values[lo])) * frac


def percentiles(values_s: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99/max of durations given in seconds, returned in milliseconds."""
    if not values_s:
        return {key: 0.0 for key in PERCENTILE_KEYS}
    ordered = sorted(float(v) for v in values_s)
    return {
        "p50": round(quantile(ordered, 0.50) * 1000.0, 3),
        "p95": round(quantile(ordered, 0.95) * 1000.0, 3),
        "p99": round(quantile(ordered, 0.99) * 1000.0, 3),
        "max": round(ordered[-1] * 1000.0, 3),
    }


def quantile_shift(
    before_s: Sequence[float], after_s: Sequence[float], q: float, resamples: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """How far the `q` quantile of `after_s` lies above that of `before_s`, in milliseconds,
    with a 95% bootstrap interval: both samples drawn again with replacement `resamples`
    times. A p99 of a few hundred samples swings by milliseconds from window to window on a
    shared machine; pooled samples and the interval say how much of a difference is noise.
    Seeded, so the same samples give the same interval."""
    if not before_s or not after_s:
        return 0.0, 0.0, 0.0
    rng = random.Random(seed)

    def at(values: Sequence[float]) -> float:
        return quantile(sorted(values), q) * 1000.0

    shifts = sorted(
        at(rng.choices(after_s, k=len(after_s))) - at(rng.choices(before_s, k=len(before_s)))
        for _ in range(resamples)
    )
    point = at(after_s) - at(before_s)
    return round(point, 3), round(quantile(shifts, 0.025), 3), round(quantile(shifts, 0.975), 3)
