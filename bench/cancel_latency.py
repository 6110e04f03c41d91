"""Stop across gateways: from `cancel` sent on gateway B to `cancelled` received on gateway A.

Cluster: 3 gateway processes and 2 synthetic workers (`--synthetic-rate 20`,
`--concurrency 600`). The canceller process runs lanes; each lane is one user with connection
A on one gateway and B on the next: A starts a chat (`max_tokens` 2000), waits for a few
chunks, B sends `cancel` with the message id, and A's `cancelled` ends the sample. Both
connections live in the same process, so one clock times the whole path (gateway B → CANCEL
script → pub/sub → worker → FINISH → pub/sub → gateway A → client).

Each mode gets a fresh cluster and four windows: (a) the cluster otherwise idle: one lane,
one stream and one cancel at a time (the goal's idle figure); (b) 6 lanes at once, still no
other load; (c) 100 background streams of 20 tokens/s (a load this 2-core machine carries,
see `bench.throughput`) and (d) 1,000 such streams spread over the 3 gateways (the goal's
load). Background streams come from another client process, at most 200 new ones a second.
Cancels per window: 200 (none started after the window's deadline). In (d) the machine
cannot deliver the tokens, so a chat is cancelled after its first chunk and the client waits
up to 20 s.

Modes: `push` (the default: the CANCEL script ends the message and its `cancelled` is
published at once; the worker is told on its own channel) and `poll` (`--cancel-mode poll`
on gateways and workers, the usual fix: the cancel only sets a Redis flag, which the worker
checks every 10 chunks before it writes the terminal itself). Redis commands per
token: the sum of `calls` in INFO commandstats over the window (commands run by Lua scripts
count), divided by the chunk tokens the clients received in that window: once over 3 s in
which only the background streams run (the streaming cost), once over the cancel window (where
each cancelled message's own commands weigh in). EXISTS per token shows the polls (plus the
worker's orphan checks, one per running job a second).

`python -m bench.cancel_latency RATE...` runs window (d) alone, push mode, at each per-stream
token rate on a fresh cluster, to show the loaded figure against how near the machine is to
what it can deliver.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from bench.cluster import ClientProc, Cluster, CpuMeter, Figures, Row, cpu_summary, progress
from bench.stats import percentiles

NAME = "cancel_latency"
GOAL_IDLE_P99_MS = 2.0
GOAL_LOAD_P99_MS = 20.0
RATE = 20
CANCELS = 200
LANES = 6
"""Cancels in flight at once (each lane: one user, one connection on each of two gateways)."""
HEAVY = 1000
"""Background streams of the "under load" window (the goal's figure)."""
MODERATE = 100
"""Background streams of a load that this 2-core machine carries (see `bench.throughput`)."""
STREAMING_WINDOW_S = 3.0
"""Seconds in which only the background streams run: their Redis commands per token."""
RAMP_PER_S = 200
"""New load streams a second: an all-at-once burst of chats exhausts the Redis client's
connection pool (redis-py's asyncio default is 100) and some chats are refused `unavailable`."""


async def _window(cluster: Cluster, ports: list[int], cancels: int, lanes: int, load: int,
                  deadline_s: float, overloaded: bool = False, streaming_s: float = STREAMING_WINDOW_S,
                  rate: float = RATE, keep_latencies: bool = False) -> dict[str, Any]:
    """One measured window: up to `cancels` cancels (none started after `deadline_s`), with
    `load` background streams. `overloaded`: the machine cannot carry the load, so a chat is
    cancelled after its first chunk and gets longer to show it. `keep_latencies`: every
    cancel's latency too (`latencies_s`), for pooling over windows."""
    loader = None
    started = 0
    streaming: dict[str, float] = {}
    if load:
        loader = await cluster.client("streams", {"ports": ports, "streams": load, "max_tokens": 2000,
                                                  "ramp_per_s": RAMP_PER_S, "ramp_timeout_s": 15})
        ready = await loader.expect("ready", timeout_s=60)
        started = int(ready["first_chunk"])
        await asyncio.sleep(2.0 if load > 100 else 0.5)  # let the ramp-up settle
        streaming = await _streaming_cost(cluster, loader, streaming_s)
    canceller = await cluster.client("cancels", {"ports": ports, "cancels": cancels, "lanes": lanes,
                                                 "wait_chunks": 1 if overloaded else 3,
                                                 "timeout_s": 20 if overloaded else 10,
                                                 "max_tokens": 2000, "deadline_s": deadline_s})
    await canceller.expect("ready", timeout_s=60)
    if loader is not None:
        await loader.request("mark", "mark")
    calls_before = await asyncio.to_thread(cluster.command_calls)
    cpu = CpuMeter(cluster.pids())
    await canceller.send("go")
    result = await canceller.expect("result", timeout_s=deadline_s + 60)
    calls_after = await asyncio.to_thread(cluster.command_calls)
    cpu_use = cpu.read()
    report = await loader.request("report", "report") if loader is not None else None
    await canceller.send("stop")
    await canceller.wait(20)
    if loader is not None:
        await loader.finish(60)

    by_command = _delta(calls_before, calls_after)
    calls = sum(by_command.values())
    tokens = int(result["tokens"]) + (int(report["tokens"]) if report else 0)
    out: dict[str, Any] = {
        "n": len(result["latencies_s"]),
        **{f"{k}_ms": v for k, v in percentiles(result["latencies_s"]).items()},
        "cancel_result": percentiles(result["cancel_result_s"]),
        "chunks_after_cancel_max": max(result["chunks_after_cancel"], default=0),
        "statuses": result["statuses"],
        "failures": result["failure_count"],
        "failure_samples": result["failures"],
        "window_s": result["elapsed_s"],
        "redis_commands": calls,
        "tokens": tokens,
        "commands_per_token": calls / tokens if tokens else 0.0,
        "commands_per_cancel": calls / max(1, len(result["latencies_s"])),
        "exists_per_token": by_command.get("exists", 0) / tokens if tokens else 0.0,
        "commands_by_name": by_command,
        "cpu_percent": cpu_use,
        "load_streams": load,
        "load_started": started,
        **streaming,
    }
    if keep_latencies:
        out["latencies_s"] = result["latencies_s"]
    if report is not None:
        out["load_gaps"] = report["gaps"]
        out["load_tokens_per_s"] = report["tokens"] / report["elapsed_s"]
        out["load_delivered_pct"] = 100.0 * report["tokens"] / (load * rate * report["elapsed_s"])
        out["load_live"] = report["live"]
    return out


def _delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """Calls per command between two INFO commandstats readings, most called first."""
    delta = {name: n - before.get(name, 0) for name, n in after.items()}
    return {name: n for name, n in sorted(delta.items(), key=lambda kv: -kv[1]) if n > 0}


async def _streaming_cost(cluster: Cluster, loader: ClientProc, seconds: float) -> dict[str, float]:
    """Redis commands per token while only the background streams run (no cancels)."""
    await loader.request("mark", "mark")
    before = await asyncio.to_thread(cluster.command_calls)
    await asyncio.sleep(seconds)
    after = await asyncio.to_thread(cluster.command_calls)
    report = await loader.request("report", "report")
    calls = _delta(before, after)
    tokens = max(1, int(report["tokens"]))
    return {
        "streaming_commands_per_token": sum(calls.values()) / tokens,
        "streaming_exists_per_token": calls.get("exists", 0) / tokens,
        "streaming_evalsha_per_token": calls.get("evalsha", 0) / tokens,
    }


WINDOWS = ("idle", "concurrent", "moderate", "heavy")


async def _start(cluster: Cluster, mode: str, rate: float) -> list[int]:
    """3 gateways and 2 synthetic workers at `rate` tokens/s per stream; the gateways' ports."""
    ports = [cluster.add_gateway("--cancel-mode", mode).port or 0 for _ in range(3)]
    for _ in range(2):
        cluster.add_worker("--engine", "synthetic", "--synthetic-rate", str(rate),
                           "--concurrency", "600", "--cancel-mode", mode)
    await cluster.wait_ready()
    return ports


async def _mode(mode: str, quick: bool) -> dict[str, Any]:
    """A fresh cluster whose workers run `--cancel-mode mode`; the three windows in turn."""
    cancels, lanes = (12, 3) if quick else (CANCELS, LANES)
    loads = {"idle": 0, "concurrent": 0, "moderate": 10 if quick else MODERATE, "heavy": 30 if quick else HEAVY}
    figures: dict[str, Any] = {}
    async with Cluster(f"{NAME}-{mode}") as cluster:
        ports = await _start(cluster, mode, RATE)
        for label in WINDOWS:
            deadline_s = 30.0 if quick or label == "heavy" else 120.0 if label == "idle" else 60.0
            overloaded = label == "heavy" and not quick
            window = await _window(cluster, ports, cancels, 1 if label == "idle" else lanes, loads[label],
                                   deadline_s, overloaded, 1.0 if quick else STREAMING_WINDOW_S)
            window["wait_chunks"] = 1 if overloaded else 3
            window["lanes"] = 1 if label == "idle" else lanes
            figures[label] = window
            progress(f"{NAME}: {mode} {label} ({loads[label]} streams): p50 {window['p50_ms']:.2f} ms, "
                     f"p99 {window['p99_ms']:.2f} ms (n={window['n']}), "
                     f"{window['commands_per_token']:.2f} Redis commands/token, {window['failures']} failures")
            if label != "heavy":
                await cluster.wait_workers_idle(30)
    return figures


async def _measure(quick: bool) -> dict[str, Any]:
    figures: dict[str, Any] = {"cancels": 12 if quick else CANCELS}
    for mode in ("push", "poll"):
        figures[mode] = await _mode(mode, quick)
    return figures


def _what(window: dict[str, Any]) -> str:
    load = int(window["load_streams"])
    if not load:
        return "idle cluster" if window["lanes"] == 1 else f"{window['lanes']} cancels at once, no other load"
    started = int(window["load_started"])
    return f"{load:,} streams" + ("" if started >= load else f" ({started:,} started)")


def _latency(mode: str, window: dict[str, Any], decimals: int) -> str:
    if not window["n"]:
        return f"{mode}: none of {window['failures']} cancels completed"
    return f"{mode} {window['p50_ms']:.{decimals}f} / {window['p99_ms']:.{decimals}f} ms (n={window['n']})"


def run(quick: bool = False) -> tuple[Figures, list[Row]]:
    progress(f"{NAME}: 3 gateways, 2 workers; a fresh cluster for push, then for poll")
    figures = asyncio.run(_measure(quick))
    push, poll = figures["push"], figures["poll"]
    goals = {"idle": GOAL_IDLE_P99_MS, "heavy": GOAL_LOAD_P99_MS}
    rows: list[Row] = []
    for label in WINDOWS:
        p, q = push[label], poll[label]
        what = _what(p)
        goal = goals.get(label)
        rows.append(Row(NAME, f"cancel→cancelled p50 / p99, {what}",
                        _latency("push", p, 1), _latency("poll", q, 0),
                        f"p99 < {goal:g} ms" if goal else "",
                        (p["p99_ms"] < goal and p["failures"] == 0 and p["n"] >= figures["cancels"])
                        if goal else None))
        if "streaming_commands_per_token" in p:
            rows.append(Row(NAME, f"Redis commands per token, streams only, {what}",
                            f"push {p['streaming_commands_per_token']:.2f} "
                            f"(EXISTS {p['streaming_exists_per_token']:.3f})",
                            f"poll {q['streaming_commands_per_token']:.2f} "
                            f"(EXISTS {q['streaming_exists_per_token']:.3f})"))
        rows.append(Row(NAME, f"Redis commands per token, cancel window, {what}",
                        f"push {p['commands_per_token']:.2f} ({p['commands_per_cancel']:,.0f}/cancel)",
                        f"poll {q['commands_per_token']:.2f} ({q['commands_per_cancel']:,.0f}/cancel)"))
        if "load_gaps" in p:
            rows.append(Row(NAME, f"background streams p99 gap / delivered, {what}",
                            f"push {p['load_gaps']['p99']:.0f} ms / {p['load_delivered_pct']:.0f}%",
                            f"poll {q['load_gaps']['p99']:.0f} ms / {q['load_delivered_pct']:.0f}%"))
        rows.append(Row(NAME, f"CPU of other processes on the machine, {what}",
                        f"push {p['cpu_percent'].get('others', 0.0):.0f}%",
                        f"poll {q['cpu_percent'].get('others', 0.0):.0f}%"))
        failed = p["failures"] + q["failures"]
        if failed:
            rows.append(Row(NAME, f"cancels that failed (timeout, other end), {what}",
                            f"push {p['failures']}", f"poll {q['failures']}", "0", False))
    rows.append(Row(NAME, f"CPU, push, {_what(push['heavy'])}", cpu_summary(push["heavy"]["cpu_percent"]),
                    "of 200% (2 cores)"))
    return figures, rows


async def _sweep(rates: list[float]) -> None:
    """The goal's loaded window alone, push mode, once per per-stream token rate, each on a
    fresh cluster: where the 1,000-stream figure stands as the load nears what the machine
    can deliver."""
    for rate in rates:
        async with Cluster(f"{NAME}-sweep") as cluster:
            ports = await _start(cluster, "push", rate)
            window = await _window(cluster, ports, CANCELS, LANES, HEAVY, 60.0, overloaded=True, rate=rate)
            print(f"{HEAVY:,} streams x {rate:g} tokens/s: cancel p50 {window['p50_ms']:.2f} ms, "
                  f"p99 {window['p99_ms']:.2f} ms (n={window['n']}, {window['failures']} failed), "
                  f"{window['load_delivered_pct']:.0f}% of tokens delivered, background p99 gap "
                  f"{window['load_gaps']['p99']:.0f} ms, CPU {cpu_summary(window['cpu_percent'])}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.cancel_latency",
        description="Sweep the loaded window over per-stream token rates (`python -m bench cancel_latency` "
                    "runs the whole benchmark).")
    parser.add_argument("rates", nargs="+", type=float, metavar="TOKENS_PER_S")
    asyncio.run(_sweep(parser.parse_args().rates))


if __name__ == "__main__":
    main()
