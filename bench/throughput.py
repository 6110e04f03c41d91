"""How many 20-tokens/s streams one gateway process carries with a p99 inter-chunk gap < 100 ms.

One gateway and two synthetic workers (`--synthetic-rate 20`, enough `--concurrency` for the
largest step). Each step starts a fresh client process with N connections, one long message
each; after every stream has its first chunk and a short settle, the client records the gap
between consecutive chunks of each stream over the measuring window. A step passes when its p99
gap is under 100 ms and every stream is still streaming. Steps go up until one fails or the time
budget is spent; the figure is the largest step that passed. CPU use of every process over
the window shows where the machine's two cores went.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bench.cluster import Cluster, CpuMeter, Figures, Row, cpu_groups, cpu_summary, progress

NAME = "throughput"
RATE = 20
GAP_BAR_MS = 100.0
STEPS = (50, 100, 150, 200, 300, 400, 500, 750, 1000, 1500, 2000, 3000, 4000, 5000)
QUICK_STEPS = (20, 50)
RAMP_PER_S = 250
"""New streams a second while a step ramps up (see `bench.cancel_latency.RAMP_PER_S`)."""


async def _step(cluster: Cluster, port: int, streams: int, settle_s: float, measure_s: float) -> dict[str, Any]:
    client = await cluster.client("streams", {"ports": [port], "streams": streams, "max_tokens": 2000,
                                              "ramp_per_s": RAMP_PER_S})
    ready = await client.expect("ready", timeout_s=240)
    await asyncio.sleep(settle_s)
    await client.request("mark", "mark")
    cpu = CpuMeter(cluster.pids())
    await asyncio.sleep(measure_s)
    report = await client.request("report", "report", timeout_s=60)
    cpu_use = cpu.read()
    await client.finish(120)
    await cluster.wait_workers_idle(30)
    expected = streams * RATE * report["elapsed_s"]
    passed = report["gaps"]["p99"] < GAP_BAR_MS and report["live"] == streams
    return {
        "streams": streams,
        "ramp_s": ready["ramp_s"],
        "gaps_ms": report["gaps"],
        "gap_count": report["gap_count"],
        "gaps_over_100ms": report["gaps_over_100ms"],
        "live": report["live"],
        "refused": ready["refused"] + report["refused"],
        "delivered_pct": 100.0 * report["tokens"] / expected if expected else 0.0,
        "tokens_per_s": report["tokens"] / report["elapsed_s"],
        "cpu_percent": cpu_use,
        "cpu_us_per_token": _per_token(cpu_use, report["tokens"] / report["elapsed_s"]),
        "passed": passed,
    }


def _per_token(cpu_percent: dict[str, float], tokens_per_s: float) -> dict[str, float]:
    """CPU microseconds each kind of process of ours spent per delivered token."""
    groups = cpu_groups(cpu_percent)
    groups.pop("others", None)
    return {g: round(pct / 100 / tokens_per_s * 1e6, 1) if tokens_per_s else 0.0 for g, pct in groups.items()}


async def _measure(quick: bool, gateway_args: tuple[str, ...] = ()) -> dict[str, Any]:
    """`gateway_args`: extra flags of the gateway (`bench.limits_cost` turns limits off)."""
    steps = QUICK_STEPS if quick else STEPS
    settle_s, measure_s, budget_s = (1.0, 2.0, 60.0) if quick else (3.0, 8.0, 150.0)
    results: list[dict[str, Any]] = []
    started = time.monotonic()
    async with Cluster(NAME) as cluster:
        gateway = cluster.add_gateway(*gateway_args)
        for _ in range(2):
            cluster.add_worker("--engine", "synthetic", "--synthetic-rate", str(RATE),
                               "--concurrency", str(max(steps) // 2 + 100))
        await cluster.wait_ready()
        for streams in steps:
            spent = time.monotonic() - started
            if results and spent + 2 * (time.monotonic() - started) / len(results) > budget_s:
                progress(f"{NAME}: time budget reached before {streams} streams")
                break
            step = await _step(cluster, gateway.port or 0, streams, settle_s, measure_s)
            step["gateway_cpu_percent"] = step["cpu_percent"].get("gateway-0", 0.0)
            results.append(step)
            progress(f"{NAME}: {streams} streams: p99 gap {step['gaps_ms']['p99']:.0f} ms, "
                     f"delivered {step['delivered_pct']:.0f}%, gateway CPU {step['gateway_cpu_percent']:.0f}%, "
                     f"{'pass' if step['passed'] else 'FAIL'}")
            if not step["passed"]:
                break
    passing = [s["streams"] for s in results if s["passed"]]
    return {"steps": results, "max_streams": max(passing, default=0), "gap_bar_ms": GAP_BAR_MS, "rate": RATE}


def run(quick: bool = False) -> tuple[Figures, list[Row]]:
    progress(f"{NAME}: one gateway, 2 workers, stepping up streams of {RATE} tokens/s")
    figures = asyncio.run(_measure(quick))
    best = figures["max_streams"]
    rows = [Row(NAME, f"most {RATE} tok/s streams on 1 gateway, p99 gap < {GAP_BAR_MS:.0f} ms", f"{best:,}",
                "", "as many as possible", None)]
    passed = [s for s in figures["steps"] if s["passed"]]
    if passed:
        top = passed[-1]
        cost = top["cpu_us_per_token"]
        rows.append(Row(NAME, f"CPU per delivered token at {top['streams']:,} streams",
                        f"{sum(cost.values()):.0f} µs in all",
                        ", ".join(f"{g} {v:.0f}" for g, v in sorted(cost.items(), key=lambda kv: -kv[1])) + " µs"))
    for step in figures["steps"]:
        rows.append(Row(
            NAME, f"  {step['streams']:,} streams: p99 / max gap, delivered",
            f"{step['gaps_ms']['p99']:.0f} / {step['gaps_ms']['max']:.0f} ms, {step['delivered_pct']:.0f}%",
            "CPU " + cpu_summary(step["cpu_percent"]),
            f"< {GAP_BAR_MS:.0f} ms", step["passed"]))
    return figures, rows
