"""The cost ratios of `bench.cluster_compare`, from made-up steps (no deployment)."""

from __future__ import annotations

from typing import Any

from bench.cluster_compare import _cancel_rows, _equal_load_ratios, _ratios, cancel_shift


def _step(gateway: float, worker: float, redis: float) -> dict[str, Any]:
    return {"us_per_token": gateway + worker + redis,
            "by_kind": {"gateway": gateway, "worker": worker, "redis": redis, "client": 20.0}}


def test_the_goal_ratio_counts_gateways_and_workers_at_the_full_load_and_redis_at_a_third() -> None:
    cluster = [_step(40.0, 90.0, 100.0)]
    single = [_step(35.0, 70.0, 60.0)]
    third = [_step(55.0, 150.0, 100.0)]
    assert _equal_load_ratios(cluster, single, third) == [230.0 / (35.0 + 70.0 + 100.0)]
    assert _ratios(cluster, single) == [230.0 / 165.0]


def test_a_round_without_cpu_figures_gives_zero_not_a_division_error() -> None:
    assert _equal_load_ratios([_step(1.0, 1.0, 1.0)], [_step(0.0, 0.0, 5.0)], [_step(9.0, 9.0, 0.0)]) == [0.0]


def _window(latencies_ms: list[float]) -> dict[str, Any]:
    ordered = sorted(latencies_ms)
    return {"p99_ms": ordered[int(0.99 * (len(ordered) - 1))], "latencies_ms": latencies_ms}


def test_the_cancel_goal_pools_every_rounds_cancels_and_keeps_each_rounds_p99_beside_it() -> None:
    single = [_window([1.0 + i / 100 for i in range(200)]), _window([1.5 + i / 100 for i in range(200)])]
    cluster = [_window([x + 0.4 for x in w["latencies_ms"]]) for w in single]
    shift = cancel_shift(single, cluster)
    assert shift["p99_extra_ms"] == 0.4 and shift["p50_extra_ms"] == 0.4
    low, high = shift["p99_extra_ci_ms"]
    assert low <= 0.4 <= high
    assert shift["p99_extra_ms_by_round"] == [0.4, 0.4]


def _cancel_summary(windows: list[dict[str, Any]]) -> dict[str, Any]:
    pooled = sorted(ms for w in windows for ms in w["latencies_ms"])
    return {"cancels": len(pooled), "cancel_failures": 0, "p50_ms": pooled[len(pooled) // 2], "p99_ms": pooled[-2],
            "p99_window_range_ms": [min(w["p99_ms"] for w in windows), max(w["p99_ms"] for w in windows)]}


def test_the_cancel_goal_is_not_judged_when_the_baselines_p99_moves_more_than_the_goal_between_windows() -> None:
    steady = [_window([1.0 + i / 100 for i in range(200)]), _window([1.2 + i / 100 for i in range(200)])]
    noisy = [steady[0], _window([1.0 + i / 100 for i in range(190)] + [9.0] * 10)]
    for single, verdict in ((steady, True), (noisy, None)):
        cluster = [_window([x + 0.4 for x in w["latencies_ms"]]) for w in steady]
        summary = {**_cancel_summary(cluster), **cancel_shift(single, cluster)}
        goal_row = _cancel_rows("cluster 7", "single 7 + replica", summary, _cancel_summary(single))[1]
        assert goal_row.met is verdict, goal_row
