"""One Redis against a 3-master Redis Cluster, same run, same machine (issue 17, "Measure").

Deployments, all started at the beginning and alive to the end: one Redis 6.2 (embedded), the
same with a replica, and a 6.2 cluster (3 masters, 3 replicas); where Debian's `redis-server` 7
is installed, one Redis 7, one with a replica, a 7 cluster (SPUBLISH) and a 7 cluster without
replicas (so no WAIT before an end is published: what sharding alone costs). A cluster with
replicas is compared with one Redis with a replica, so that both pay for replication; one
without, with one Redis alone. Each has 2 gateways and 2 synthetic workers (20 tokens/s per
stream); on a cluster they run with `--redis-cluster` (4 shards per master). Each round
measures every deployment in turn, the order reversed every other round (ABBA: the machine is
shared and its load drifts):

- cost per token: `bench.throughput`'s step, N streams of 20 tokens/s through one gateway (a
  load the 2-core machine carries on all of them), delivered tokens/s and the CPU each kind of
  process spent per delivered token (gateway, worker, Redis summed over every node; per node
  too, which gives what one master pays per token of its own shard); one Redis also at a third
  of the streams, the tokens/s each master of a cluster serves (a server's cost per token falls
  as its load grows: more commands per read, per write and per wake-up);
- the goal's ratio compares every process at the load it carries in the deployment that
  would run a cluster: one that outgrew one Redis. Its gateways and workers do not change with
  Redis's topology, so both sides count them at N streams; each master then carries what one
  Redis would, so one Redis counts at N/3. The ratio is the cluster's CPU per token at N over
  one Redis's gateways and workers at N plus its Redis at N/3: what sharding adds (a worker's
  round trip per master per batch, a gateway's subscriptions per node, 6.2's broadcast
  PUBLISH), without the gain or loss of running the gateways and workers at another load. At
  the same total load on one machine the cluster's masters each see a third of it and Redis's
  fixed cost per round trip (`bench.cluster_trips`) is paid three times: that ratio is
  reported beside it;
- idle: the CPU each kind of process uses with nothing to do (beats, blocking reads, a
  cluster's gossip), the fixed part of the cost per token;
- cancel latency: `bench.cancel_latency`'s idle window (one stream and one cancel at a time,
  the cancel sent on the other gateway), p50 / p99 of the push path. The goal's p99 difference
  pools every round's cancels of a deployment, with a bootstrap interval
  (`bench.stats.quantile_shift`): the p99 of one window of a few hundred cancels swings by
  milliseconds from window to window here. Each round's difference is shown beside it.

After the rounds, on each cluster: how long a PUBLISH takes to reach a subscriber on the
publishing master and on another master (through the cluster bus), the path of every frame
on a 6.2 cluster. The figures are medians over rounds, with each round's cluster / single
ratio. Pub/sub CPU per message (SPUBLISH vs PUBLISH) is `bench.cluster_pubsub`'s.

    python -m bench.cluster_compare [--rounds 3] [--streams 300] [--cancels 200] [--cancels-only] [--json PATH]

`--cancels-only` runs the cancel windows alone (more rounds and cancels in the same time).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

from redis.crc import key_slot

from bench import cancel_latency, throughput
from bench.cluster import Cluster, CpuMeter, Figures, Row, cpu_groups, cpu_summary, progress
from bench.stats import percentiles, quantile_shift
from store import embedded
from store.embedded import EmbeddedCluster

NAME = "cluster_compare"
GOAL_COST_RATIO = 1.15
GOAL_P99_EXTRA_MS = 1.0
ROUNDS, STREAMS, CANCELS = 3, 300, 200
IDLE_S = 5.0
BUS_SAMPLES = 1000
REDIS_CORE_SHARE = 0.5
"""The share of one core a master is planned to use in the capacity table: the rest is
headroom for bursts, reconnect storms and the latency a busy single-threaded server adds."""
OURS = ("gateway", "worker", "redis")
BUS_SCRIPT = "redis.call('PUBLISH', KEYS[1], ARGV[1]) return redis.call('PUBLISH', KEYS[2], ARGV[1])"
"""Two frames published back to back (a chunk and the next, an end and the worker's push)."""


@dataclass(frozen=True)
class Target:
    version: str
    cluster: bool
    server: str
    replicas: int = 1

    @property
    def name(self) -> str:
        if not self.cluster:
            return f"single {self.version}" + (" + replica" if self.replicas else "")
        return f"cluster {self.version}" + ("" if self.replicas else " no replicas")


def targets() -> list[Target]:
    found = [Target("6.2", False, "", replicas=0), Target("6.2", False, "", replicas=1), Target("6.2", True, "")]
    redis7 = embedded.redis7_server()
    if redis7 is not None:
        found += [Target("7", False, redis7, replicas=0), Target("7", False, redis7, replicas=1),
                  Target("7", True, redis7), Target("7", True, redis7, replicas=0)]
    return found


def _order(found: list[Target], round_: int) -> list[Target]:
    """ABBA: odd rounds run the even rounds' order backwards, so a drift in the machine's load
    favours neither one Redis nor its cluster."""
    return found if round_ % 2 == 0 else found[::-1]


async def _deployment(stack: AsyncExitStack, target: Target, streams: int) -> tuple[Cluster, list[int]]:
    cluster = await stack.enter_async_context(Cluster(
        f"{NAME}-{target.name.replace(' ', '-').replace('+', 'and')}", redis_cluster=target.cluster,
        redis_server=target.server, cluster_replicas=target.replicas,
        single_replica=not target.cluster and target.replicas > 0,
    ))
    ports = [cluster.add_gateway().port or 0 for _ in range(2)]
    for _ in range(2):
        cluster.add_worker("--engine", "synthetic", "--synthetic-rate", str(throughput.RATE),
                           "--concurrency", str(streams // 2 + 100))
    await cluster.wait_ready(120)
    return cluster, ports


def _cost(step: dict[str, Any], masters: int) -> dict[str, Any]:
    """CPU per delivered token: by kind of process, each Redis node, and what one master pays
    per token of its own shard: with the shards spread evenly over `masters`, each master
    serves 1/masters of the tokens, so that is the masters' CPU summed over all the tokens (and
    the busiest master's times `masters`, the pessimistic reading)."""
    rate = step["tokens_per_s"]
    nodes = {name: round(pct / 100 / rate * 1e6, 2) if rate else 0.0
             for name, pct in step["cpu_percent"].items() if name.startswith("redis")}
    master_us = [us for name, us in nodes.items() if "-replica-" not in name]
    return {
        "us_per_token": round(sum(step["cpu_us_per_token"].get(g, 0.0) for g in OURS), 1),
        "by_kind": step["cpu_us_per_token"],
        "redis_nodes": nodes,
        "master_us_per_own_token": round(sum(master_us), 2),
        "busiest_master_us_per_own_token": round(max(master_us, default=0.0) * masters, 2),
        "replicas_us_per_token": round(sum(us for name, us in nodes.items() if "-replica-" in name), 2),
    }


async def _throughput(cluster: Cluster, port: int, streams: int, quick: bool) -> dict[str, Any]:
    settle_s, measure_s = (1.0, 2.0) if quick else (3.0, 10.0)
    step = await throughput._step(cluster, port, streams, settle_s, measure_s)
    return {
        "tokens_per_s": round(step["tokens_per_s"], 1),
        "delivered_pct": round(step["delivered_pct"], 1),
        "p99_gap_ms": step["gaps_ms"]["p99"],
        "live": step["live"],
        "refused": step["refused"],
        "cpu_percent": step["cpu_percent"],
        "others_cpu_percent": step["cpu_percent"].get("others", 0.0),
        **_cost(step, 3 if cluster.redis_cluster else 1),
    }


def _report(what: str, result: dict[str, Any]) -> None:
    progress(f"{NAME}: {what}: {result['tokens_per_s']:,.0f} tokens/s ({result['delivered_pct']:.0f}%), "
             f"{result['us_per_token']:.1f} µs CPU/token "
             f"({', '.join(f'{k} {v:.1f}' for k, v in result['by_kind'].items())}), "
             f"p99 gap {result['p99_gap_ms']:.0f} ms, others {result['others_cpu_percent']:.0f}%")


async def _idle(cluster: Cluster, quick: bool) -> dict[str, float]:
    """CPU % by kind of process while the deployment has nothing to do."""
    cpu = CpuMeter(cluster.pids())
    await asyncio.sleep(1.0 if quick else IDLE_S)
    return cpu_groups(cpu.read())


async def _cancels(cluster: Cluster, ports: list[int], cancels: int, quick: bool) -> dict[str, Any]:
    window = await cancel_latency._window(cluster, ports, cancels, 1, 0, 30.0 if quick else 300.0,
                                          keep_latencies=True)
    await cluster.wait_workers_idle(30)
    return {
        "n": window["n"], "failures": window["failures"],
        **{key: window[key] for key in ("p50_ms", "p95_ms", "p99_ms", "max_ms")},
        "commands_per_cancel": round(window["commands_per_cancel"], 1),
        "others_cpu_percent": window["cpu_percent"].get("others", 0.0),
        "latencies_ms": [round(s * 1000, 4) for s in window["latencies_s"]],
    }


def bus_latency(cluster: EmbeddedCluster, samples: int) -> dict[str, dict[str, float]]:
    """PUBLISH latency (`BUS_SCRIPT` on the channel's master, until the second frame arrives)
    to a subscriber on that master and to one on another master (through the cluster bus)."""
    first, second = "tr:{bench}:bus:1", "tr:{bench}:bus:2"
    owner = cluster.owner(key_slot(second.encode()))
    other = next(node for node in cluster.masters() if node.port != owner.port)
    result: dict[str, dict[str, float]] = {}
    with owner.client(10) as publisher:
        sha = publisher.script_load(BUS_SCRIPT)
        for where, node in (("same_master", owner), ("other_master", other)):
            with node.client(10) as listener:
                subscription = listener.pubsub()
                subscription.subscribe(second)
                subscription.get_message(timeout=5)  # the confirmation
                latencies = []
                for _ in range(samples):
                    began = time.perf_counter()
                    publisher.evalsha(sha, 2, first, second, "x")
                    while (message := subscription.get_message(timeout=5)) is None or message["type"] != "message":
                        pass
                    latencies.append(time.perf_counter() - began)
                    time.sleep(0.005)
                subscription.close()
            result[where] = percentiles(latencies)
    return result


async def _measure(rounds: int, streams: int, cancels: int, quick: bool, cancels_only: bool = False) -> Figures:
    found = targets()
    figures: Figures = {t.name: {"throughput": [], "idle": [], "cancel": []} for t in found}
    for target in found:
        if not target.cluster:
            figures[target.name]["throughput_third"] = []
    figures["load_average"] = [list(os.getloadavg())]
    async with AsyncExitStack() as stack:
        deployments = {}
        for target in found:
            deployments[target.name] = await _deployment(stack, target, streams)
        progress(f"{NAME}: {len(found)} deployments up: {', '.join(t.name for t in found)}")
        for round_ in range(rounds):
            order = _order(found, round_)
            for target in [] if cancels_only else order:
                cluster, ports = deployments[target.name]
                result = await _throughput(cluster, ports[0], streams, quick)
                figures[target.name]["throughput"].append(result)
                _report(f"#{round_ + 1} {target.name}", result)
                if not target.cluster:
                    third = await _throughput(cluster, ports[0], streams // 3, quick)
                    figures[target.name]["throughput_third"].append(third)
                    _report(f"#{round_ + 1} {target.name} at {streams // 3} streams", third)
            for target in [] if cancels_only else order:
                idle = await _idle(deployments[target.name][0], quick)
                figures[target.name]["idle"].append(idle)
                progress(f"{NAME}: #{round_ + 1} {target.name} idle: {cpu_summary(idle)}")
            for target in order:
                cluster, ports = deployments[target.name]
                result = await _cancels(cluster, ports, cancels, quick)
                figures[target.name]["cancel"].append(result)
                progress(f"{NAME}: #{round_ + 1} {target.name}: cancel p50 {result['p50_ms']:.3f} ms, "
                         f"p99 {result['p99_ms']:.3f} ms (n={result['n']}, {result['failures']} failed), "
                         f"others {result['others_cpu_percent']:.0f}%")
            figures["load_average"].append(list(os.getloadavg()))
        for target in found:
            cluster = deployments[target.name][0]
            if cluster.embedded_cluster is not None and not cancels_only:
                bus = await asyncio.to_thread(bus_latency, cluster.embedded_cluster, 50 if quick else BUS_SAMPLES)
                figures[target.name]["bus_latency"] = bus
                progress(f"{NAME}: {target.name}: PUBLISH to a subscriber on the same master {bus['same_master']}, "
                         f"on another master {bus['other_master']}")
            figures[target.name]["failed_over"] = await asyncio.to_thread(cluster.cluster_roles_changed)
    figures["targets"] = [t.name for t in found]
    figures.update(rounds=rounds, streams=streams, cancels=cancels, rate=throughput.RATE, cancels_only=cancels_only)
    return figures


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in runs))


def baseline_of(name: str, targets: list[str]) -> str:
    """What a cluster is compared with: one Redis of its version, with a replica when the
    cluster has replicas (and that deployment ran), so both pay for replication."""
    single = f"single {name.split()[1]}"
    if "no replicas" not in name and f"{single} + replica" in targets:
        return f"{single} + replica"
    return single


def summarize(figures: Figures) -> dict[str, Any]:
    """Medians over rounds per deployment (cancel latencies: every round's pooled); for a
    cluster, per round and median ratios to the one Redis of its version."""
    summary: dict[str, Any] = {}
    for name in figures["targets"]:
        c = figures[name]["cancel"]
        pooled = percentiles([ms / 1000 for ms in _pooled(c)])
        summary[name] = {
            **{f"{key}_ms": pooled[key] for key in ("p50", "p95", "p99")},
            "cancels": sum(r["n"] for r in c),
            "cancel_failures": sum(r["failures"] for r in c),
            "p99_window_range_ms": [min(r["p99_ms"] for r in c), max(r["p99_ms"] for r in c)],
        }
        if name.startswith("cluster"):
            summary[name].update(cancel_shift(figures[baseline_of(name, figures["targets"])]["cancel"], c))
        if not figures.get("cancels_only"):
            summary[name].update(_cost_summary(figures, name))
    return summary


def _pooled(windows: list[dict[str, Any]]) -> list[float]:
    return [ms for window in windows for ms in window["latencies_ms"]]


def cancel_shift(single: list[dict[str, Any]], cluster: list[dict[str, Any]]) -> dict[str, Any]:
    """How much later a cancel lands on the cluster than on one Redis: p99 and p50 over every
    round's cancels pooled (the goal's p99 with its 95% interval), and each round's p99."""
    before, after = [ms / 1000 for ms in _pooled(single)], [ms / 1000 for ms in _pooled(cluster)]
    p99, low, high = quantile_shift(before, after, 0.99)
    by_round = [b["p99_ms"] - a["p99_ms"] for a, b in zip(single, cluster)]
    return {
        "p99_extra_ms": p99, "p99_extra_ci_ms": [low, high],
        "p50_extra_ms": round(percentiles(after)["p50"] - percentiles(before)["p50"], 3),
        "p99_extra_ms_by_round": [round(e, 3) for e in by_round],
    }


def _cost_summary(figures: Figures, name: str) -> dict[str, Any]:
    """The throughput and idle steps' medians; for a cluster, its cost ratios."""
    t, idle = figures[name]["throughput"], figures[name]["idle"]
    summary: dict[str, Any] = {
        **{key: _median(t, key) for key in (
            "tokens_per_s", "delivered_pct", "us_per_token", "master_us_per_own_token",
            "busiest_master_us_per_own_token", "replicas_us_per_token", "others_cpu_percent")},
        **{f"{kind}_us_per_token": float(statistics.median(r["by_kind"].get(kind, 0.0) for r in t))
           for kind in OURS},
        **{f"{kind}_idle_cpu_percent": float(statistics.median(r.get(kind, 0.0) for r in idle)) for kind in OURS},
    }
    if "throughput_third" in figures[name]:
        third = figures[name]["throughput_third"]
        summary.update(third_tokens_per_s=_median(third, "tokens_per_s"),
                       third_us_per_token=_median(third, "us_per_token"),
                       third_redis_us_per_token=_median(third, "master_us_per_own_token"))
    if name.startswith("cluster"):
        single = figures[baseline_of(name, figures['targets'])]
        ratios = _ratios(t, single["throughput"])
        equal_load = _equal_load_ratios(t, single["throughput"], single["throughput_third"])
        summary.update(
            cost_ratio_by_round=[round(r, 3) for r in ratios], cost_ratio=round(statistics.median(ratios), 3),
            equal_load_cost_ratio_by_round=[round(r, 3) for r in equal_load],
            equal_load_cost_ratio=round(statistics.median(equal_load), 3),
        )
    summary["capacity"] = capacity(summary["master_us_per_own_token"])
    return summary


def _ratios(cluster: list[dict[str, Any]], single: list[dict[str, Any]]) -> list[float]:
    """Per round: the cluster's CPU per token over one Redis's."""
    return [b["us_per_token"] / a["us_per_token"] if a["us_per_token"] else 0.0 for a, b in zip(single, cluster)]


def _equal_load_ratios(cluster: list[dict[str, Any]], single: list[dict[str, Any]],
                       third: list[dict[str, Any]]) -> list[float]:
    """Per round: the cluster's CPU per token over one Redis's gateways and workers at the same
    streams plus its Redis at a third of them (what one master of the cluster carries)."""
    ratios = []
    for c, s, t in zip(cluster, single, third):
        base = s["by_kind"].get("gateway", 0.0) + s["by_kind"].get("worker", 0.0) + t["by_kind"].get("redis", 0.0)
        ratios.append(c["us_per_token"] / base if base else 0.0)
    return ratios


def capacity(master_us_per_token: float) -> dict[str, int]:
    """Tokens/s one master carries at `REDIS_CORE_SHARE` of a core, and masters for 10,000 and
    100,000 streams of 20 tokens/s (one token a chunk, as a 20 tokens/s stream sends them)."""
    per_master = int(REDIS_CORE_SHARE * 1e6 / master_us_per_token) if master_us_per_token else 0
    return {
        "tokens_per_s_per_master": per_master,
        "masters_10k_streams": -(-10_000 * throughput.RATE // per_master) if per_master else 0,
        "masters_100k_streams": -(-100_000 * throughput.RATE // per_master) if per_master else 0,
    }


def _kinds(s: dict[str, Any]) -> str:
    return (f"{s['us_per_token']:.1f} µs (gw {s['gateway_us_per_token']:.1f}, wk {s['worker_us_per_token']:.1f}, "
            f"redis {s['redis_us_per_token']:.1f})")


def _idle_text(s: dict[str, Any]) -> str:
    return " / ".join(f"{s[f'{kind}_idle_cpu_percent']:.1f}" for kind in OURS) + "%"


def rows(figures: Figures, summary: dict[str, Any]) -> list[Row]:
    out: list[Row] = []
    for name in [n for n in figures["targets"] if n.startswith("cluster")]:
        base = baseline_of(name, figures["targets"])
        cluster, single = summary[name], summary[base]
        if not figures.get("cancels_only"):
            out += _cost_rows(figures, name, base, cluster, single)
        out += _cancel_rows(name, base, cluster, single)
        bus = figures[name].get("bus_latency")
        if bus:
            out.append(Row(NAME, f"{name}: PUBLISH to a subscriber on another master / the same, p50 / p99",
                           f"{bus['other_master']['p50']:.2f} / {bus['other_master']['p99']:.2f} ms",
                           f"{bus['same_master']['p50']:.2f} / {bus['same_master']['p99']:.2f} ms"))
    failed_over = [n for n in figures["targets"] if figures[n]["failed_over"]]
    if failed_over:
        out.append(Row(NAME, "a cluster failed over during the run", ", ".join(failed_over), "", "none", False))
    if not figures.get("cancels_only"):
        others = [summary[n]["others_cpu_percent"] for n in figures["targets"]]
        out.append(Row(NAME, "CPU of other processes during the throughput steps (of 200%)",
                       f"{min(others):.0f}-{max(others):.0f}%",
                       "load average " + " → ".join(f"{la[0]:.1f}" for la in figures["load_average"])))
        for name in figures["targets"]:
            out.append(Row(NAME, f"CPU, {name}, last round",
                           cpu_summary(figures[name]["throughput"][-1]["cpu_percent"]), "of 200% (2 cores)"))
    return out


def _cost_rows(
    figures: Figures, name: str, base: str, cluster: dict[str, Any], single: dict[str, Any]
) -> list[Row]:
    """CPU per token, the goal's cost ratio and what it is made of, and capacity, for one cluster."""
    out: list[Row] = []
    streams = figures["streams"]
    load = f"{streams:,} streams × {figures['rate']} tok/s"
    of = f"median of {figures['rounds']}"
    out.append(Row(NAME, f"{name}: CPU per delivered token, {load} ({of})", _kinds(cluster),
                   f"{base}: {_kinds(single)}"))
    out.append(Row(NAME, f"{name}: cost per token / single's, each process at its load (gateways and "
                         f"workers at {streams:,} streams, a master at {streams // 3:,}), by round",
                   f"{cluster['equal_load_cost_ratio']:.2f} (median)",
                   ", ".join(f"{r:.2f}" for r in cluster["equal_load_cost_ratio_by_round"]),
                   f"≤ +{(GOAL_COST_RATIO - 1) * 100:.0f}%", cluster["equal_load_cost_ratio"] <= GOAL_COST_RATIO))
    out.append(Row(NAME, f"{name}: cost per token / single's at the same total load, by round",
                   f"{cluster['cost_ratio']:.2f} (median)",
                   ", ".join(f"{r:.2f}" for r in cluster["cost_ratio_by_round"])))
    out.append(Row(NAME, f"{name}: tokens/s delivered", f"{cluster['tokens_per_s']:,.0f} "
                   f"({cluster['delivered_pct']:.0f}%)", f"{base}: {single['tokens_per_s']:,.0f} "
                   f"({single['delivered_pct']:.0f}%)"))
    out.append(Row(NAME, f"{name}: CPU % when idle (gateway / worker / Redis)", _idle_text(cluster),
                   f"{base}: {_idle_text(single)}"))
    out.append(Row(NAME, f"{name}: Redis µs per token: a master per own token (busiest); replicas",
                   f"{cluster['master_us_per_own_token']:.1f} ({cluster['busiest_master_us_per_own_token']:.1f}); "
                   f"{cluster['replicas_us_per_token']:.1f}",
                   f"{base}: {single['redis_us_per_token']:.1f}; at {single['third_tokens_per_s']:,.0f} tokens/s "
                   f"{single['third_redis_us_per_token']:.1f}"))
    cap = cluster["capacity"]
    out.append(Row(NAME, f"{name}: tokens/s per master at {REDIS_CORE_SHARE:.0%} of a core; masters for "
                         f"10k / 100k streams", f"{cap['tokens_per_s_per_master']:,}",
                   f"{cap['masters_10k_streams']} / {cap['masters_100k_streams']}"))
    return out


def _cancel_rows(name: str, base: str, cluster: dict[str, Any], single: dict[str, Any]) -> list[Row]:
    """Cancel latency, every round's cancels pooled; the goal is judged on the pooled p99,
    unless the baseline's p99 moved by more than the goal from window to window: then the
    machine's noise is larger than what is measured, and the row says so instead."""
    low, high = cluster["p99_extra_ci_ms"]
    spread_low, spread_high = single["p99_window_range_ms"]
    noisy = spread_high - spread_low > GOAL_P99_EXTRA_MS
    failures = cluster["cancel_failures"] + single["cancel_failures"]
    met = None if noisy and not failures else cluster["p99_extra_ms"] <= GOAL_P99_EXTRA_MS and not failures
    return [
        Row(NAME, f"{name}: cancel p50 / p99, idle ({cluster['cancels']:,} cancels pooled)",
            f"{cluster['p50_ms']:.2f} / {cluster['p99_ms']:.2f} ms",
            f"{base}: {single['p50_ms']:.2f} / {single['p99_ms']:.2f} ms"),
        Row(NAME, f"{name}: cancel p99 − single's, pooled (95% interval); p50 − single's",
            f"{cluster['p99_extra_ms']:+.2f} ms ({low:+.2f} to {high:+.2f}); {cluster['p50_extra_ms']:+.2f} ms",
            "by round: " + ", ".join(f"{e:+.2f}" for e in cluster["p99_extra_ms_by_round"])
            + f"; {base}'s p99 by window {spread_low:.2f}-{spread_high:.2f} ms"
            + (": wider than the goal, not judged" if met is None else ""),
            f"p99 ≤ +{GOAL_P99_EXTRA_MS:g} ms", met),
    ]


def run(
    quick: bool = False, rounds: int = ROUNDS, streams: int = STREAMS, cancels: int = CANCELS,
    cancels_only: bool = False,
) -> tuple[Figures, list[Row]]:
    if quick:
        rounds, streams, cancels = 1, 20, 10
    steps = f"{cancels} cancels" if cancels_only else f"{streams} streams and {cancels} cancels"
    progress(f"{NAME}: one Redis vs a 3-master cluster, {rounds} rounds of {steps}")
    began = time.monotonic()
    figures = asyncio.run(_measure(rounds, streams, cancels, quick, cancels_only))
    figures["measure_s"] = round(time.monotonic() - began, 1)
    figures["summary"] = summarize(figures)
    return figures, rows(figures, figures["summary"])


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.cluster_compare", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--streams", type=int, default=STREAMS, help="streams of the throughput step")
    parser.add_argument("--cancels", type=int, default=CANCELS, help="cancels per idle window")
    parser.add_argument("--cancels-only", action="store_true", help="only the cancel windows")
    parser.add_argument("--json", help="write every figure to this file")
    args = parser.parse_args()
    figures, table = run(False, args.rounds, args.streams, args.cancels, args.cancels_only)
    for row in table:
        verdict = "not judged" if row.met is None else "met" if row.met else "NOT met"
        goal = f" | goal {row.goal}: {verdict}" if row.goal else ""
        print(f"{row.measure}: {row.value} | {row.compared}{goal}")
    if args.json:
        with open(args.json, "w") as file:
            json.dump(figures, file, indent=2)


if __name__ == "__main__":
    main()
