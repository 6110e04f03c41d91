"""What PROTOCOL.md's limits cost (issue 15): gateways with every limit on (the defaults) and
off (each one 0, unlimited) in the same cluster, measured in turn and repeated, since the
machine is shared and its load drifts.

- throughput: `bench.throughput`'s step (N streams of 20 tokens/s on one gateway, a fresh
  client process each time) through the limited and the unlimited gateway in turn: delivered
  share, p99 gap, and that gateway's CPU per delivered token, which is where checks would show;
  with `--full`, `bench.throughput`'s whole stepped figure (most streams with a p99 gap under
  100 ms) once per mode as well;
- cancel latency: `bench.cancel_latency`'s idle window (one lane: one stream, one cancel at a
  time, across gateways) on 3 limited and on 3 unlimited gateways in turn.

    python -m bench.limits_cost [--repeat 3] [--streams 500] [--cancels 200] [--full]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
from typing import Any

from bench import cancel_latency, throughput
from bench.cluster import Cluster, progress

NAME = "limits_cost"
OFF = (
    "--request-rate", "0", "--control-rate", "0", "--max-generations-per-user", "0",
    "--max-connections-per-user", "0", "--max-bad-requests", "0",
)
MODES: dict[str, tuple[str, ...]] = {"on": (), "off": OFF}


def _order(rep: int) -> list[str]:
    """Alternate which mode goes first, so a drift in the machine's load favours neither."""
    return ["on", "off"] if rep % 2 == 0 else ["off", "on"]


async def _throughput(repeat: int, streams: int) -> dict[str, list[dict[str, Any]]]:
    runs: dict[str, list[dict[str, Any]]] = {"on": [], "off": []}
    async with Cluster(f"{NAME}-throughput") as cluster:
        gateways = {mode: cluster.add_gateway(*args) for mode, args in MODES.items()}
        for _ in range(2):
            cluster.add_worker("--engine", "synthetic", "--synthetic-rate", str(throughput.RATE),
                               "--concurrency", str(streams // 2 + 100))
        await cluster.wait_ready()
        for rep in range(repeat):
            for mode in _order(rep):
                gateway = gateways[mode]
                step = await throughput._step(cluster, gateway.port or 0, streams, 3.0, 8.0)
                cpu = step["cpu_percent"].get(gateway.name, 0.0)
                run = {"delivered_pct": step["delivered_pct"], "p99_gap_ms": step["gaps_ms"]["p99"],
                       "tokens_per_s": step["tokens_per_s"], "gateway_cpu_percent": cpu,
                       "gateway_us_per_token": cpu / 100 / step["tokens_per_s"] * 1e6 if step["tokens_per_s"] else 0.0,
                       "refused": step["refused"], "others_cpu_percent": step["cpu_percent"].get("others", 0.0)}
                runs[mode].append(run)
                progress(f"{NAME}: throughput {mode} #{rep + 1}: {run['gateway_us_per_token']:.1f} µs/token, "
                         f"gateway CPU {cpu:.0f}%, p99 gap {run['p99_gap_ms']:.0f} ms, "
                         f"delivered {run['delivered_pct']:.1f}%, refused {run['refused']}")
    return runs


async def _cancels(repeat: int, cancels: int) -> dict[str, list[dict[str, Any]]]:
    runs: dict[str, list[dict[str, Any]]] = {"on": [], "off": []}
    async with Cluster(f"{NAME}-cancel") as cluster:
        ports = {mode: [cluster.add_gateway(*args).port or 0 for _ in range(3)] for mode, args in MODES.items()}
        for _ in range(2):
            cluster.add_worker("--engine", "synthetic", "--synthetic-rate", str(cancel_latency.RATE),
                               "--concurrency", "600")
        await cluster.wait_ready()
        for rep in range(repeat):
            for mode in _order(rep):
                window = await cancel_latency._window(cluster, ports[mode], cancels, 1, 0, 120.0)
                run = {"p50_ms": window["p50_ms"], "p99_ms": window["p99_ms"], "n": window["n"],
                       "failures": window["failures"], "others_cpu_percent": window["cpu_percent"].get("others", 0.0)}
                runs[mode].append(run)
                progress(f"{NAME}: cancel {mode} #{rep + 1}: p50 {run['p50_ms']:.3f} ms, p99 {run['p99_ms']:.3f} ms "
                         f"(n={run['n']}, {run['failures']} failed, others {run['others_cpu_percent']:.0f}%)")
                await cluster.wait_workers_idle(30)
    return runs


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in runs))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.limits_cost", description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--streams", type=int, default=500, help="streams of the fixed throughput step")
    parser.add_argument("--cancels", type=int, default=200, help="cancels per idle window")
    parser.add_argument("--full", action="store_true", help="also bench.throughput's stepped figure per mode")
    parser.add_argument("--skip", choices=["throughput", "cancel"], action="append", default=[])
    parser.add_argument("--json", help="write every figure to this file")
    args = parser.parse_args()
    figures: dict[str, Any] = {}
    if "throughput" not in args.skip:
        figures["throughput"] = asyncio.run(_throughput(args.repeat, args.streams))
    if "cancel" not in args.skip:
        figures["cancel"] = asyncio.run(_cancels(args.repeat, args.cancels))
    if args.full:
        figures["max_streams"] = {mode: asyncio.run(throughput._measure(False, args_))["max_streams"]
                                  for mode, args_ in MODES.items()}
    if "throughput" in figures:
        t = figures["throughput"]
        on, off = _median(t["on"], "gateway_us_per_token"), _median(t["off"], "gateway_us_per_token")
        print(f"throughput, {args.streams} streams x {throughput.RATE} tokens/s, median of {args.repeat}: gateway CPU "
              f"per delivered token {on:.2f} µs with limits, {off:.2f} µs without ({(on / off - 1) * 100:+.1f}%); "
              f"delivered {_median(t['on'], 'delivered_pct'):.1f}% / {_median(t['off'], 'delivered_pct'):.1f}%; "
              f"p99 gap {_median(t['on'], 'p99_gap_ms'):.0f} / {_median(t['off'], 'p99_gap_ms'):.0f} ms")
    if "cancel" in figures:
        c = figures["cancel"]
        print(f"cancel latency, idle, median of {args.repeat} windows of {args.cancels}: p50 "
              f"{_median(c['on'], 'p50_ms'):.3f} ms with limits, {_median(c['off'], 'p50_ms'):.3f} ms without; p99 "
              f"{_median(c['on'], 'p99_ms'):.3f} / {_median(c['off'], 'p99_ms'):.3f} ms")
    if "max_streams" in figures:
        print(f"most streams with p99 gap < 100 ms: {figures['max_streams']['on']} with limits, "
              f"{figures['max_streams']['off']} without")
    if args.json:
        with open(args.json, "w") as file:
            json.dump(figures, file, indent=2)


if __name__ == "__main__":
    main()
