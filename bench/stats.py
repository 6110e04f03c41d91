"""Latency percentiles shared by the bench tools.

``percentiles`` takes durations in **seconds** and returns a dict with keys
``p50``, ``p95``, ``p99`` and ``max`` in **milliseconds**, rounded to 3
decimals.  An empty input gives zeros for every key.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["PERCENTILE_KEYS", "percentiles", "quantile"]

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
