"""`python -m bench soak [--minutes N]` (default 30; not in `make bench`'s default set): steady
load with churn for N minutes, then whether memory and keys stayed bounded.

Processes: Redis, 2 gateways, 2 synthetic workers (20 tokens/s). The load is `bench.loadtest`'s
clients (in this process), chatting without pause: 20% of the messages cancelled (half of those
over a second connection), 20% dropped mid-stream and resumed on the other gateway, so
connections open and close all the time. After the warm-up (a tenth of the run, at least a
minute, at most half of it) and at the end it reads the RSS of every gateway, worker and Redis
process (/proc), Redis's key count (DBSIZE) and `used_memory`; every 30 s in between too.

Goals: every gateway's and worker's RSS grows less than 10% from the warm-up to the end; the
key count stays under what the lifetimes allow (`key_bound`: each message keeps its meta and
log until 10 minutes after its end, its grace and idempotency records 30 s, each session its
history and answers). Redis's own RSS and memory are reported beside them: its job stream keeps
up to 100,000 entries by design (issue 14, item 6).
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from typing import Any

from bench.cluster import BenchError, Cluster, Figures, Row, progress, rss_kib
from bench.loadconfig import LoadConfig, Results
from bench.loadtest import raise_open_files_limit, run_load
from store.settings import Lifetimes

NAME = "soak"
RATE = 20
CLIENTS = 40
MAX_TOKENS = 50
SAMPLE_S = 30.0
RSS_GROWTH_GOAL_PCT = 10.0
KEY_WINDOW_S = Lifetimes().ended_ttl_s + 60
"""How long a message's meta and log can outlive its start: 10 minutes after its end, plus
its own generation and any wait in the queue (generously, a minute)."""


@dataclass(frozen=True)
class Sample:
    at_s: float
    accepted: int
    rss_kib: dict[str, int]
    keys: int
    used_memory: int


def key_bound(samples: list[Sample], now: Sample, sessions: int, processes: int) -> int:
    """The most keys the lifetimes allow at `now`: 2 per message accepted within the last
    `KEY_WINDOW_S` (meta, log), 3 more per message of the last minute (grace, idempotency,
    attach lease), 2 per session (history, answers), 2 per process (registry, liveness), and
    a handful of global keys (job streams, admission counter)."""
    def accepted_before(seconds: float) -> int:
        older = [s.accepted for s in samples if s.at_s <= now.at_s - seconds]
        return older[-1] if older else 0

    recent, last_minute = now.accepted - accepted_before(KEY_WINDOW_S), now.accepted - accepted_before(60)
    return 2 * recent + 3 * last_minute + 2 * sessions + 2 * processes + 10


def sample(cluster: Cluster, results: Results, started: float) -> Sample:
    rss: dict[str, int] = {}
    for server in [cluster.redis, *cluster.gateways, *cluster.workers]:
        try:
            rss[server.name] = rss_kib(server.pid)
        except (OSError, RuntimeError) as exc:
            progress(f"{NAME}: no RSS for {server.name}: {exc}")
    client = cluster.redis_client()
    try:
        keys = int(client.dbsize())
        used = int(client.info("memory")["used_memory"])
    finally:
        client.close()
    return Sample(round(time.perf_counter() - started, 1), results.accepted, rss, keys, used)


async def _measure(minutes: float) -> dict[str, Any]:
    raise_open_files_limit()
    run_s = minutes * 60
    warmup_s = min(max(60.0, run_s / 10), run_s / 2)
    async with Cluster(NAME) as cluster:
        for _ in range(2):
            cluster.add_gateway()
        for _ in range(2):
            cluster.add_worker("--engine", "synthetic", "--synthetic-rate", str(RATE), "--concurrency", "200")
        await cluster.wait_ready()
        config = LoadConfig(
            urls=[f"ws://127.0.0.1:{g.port}/ws" for g in cluster.gateways], clients=CLIENTS, messages=None,
            duration_s=run_s, max_tokens=MAX_TOKENS, cancel_rate=0.2, reconnect_rate=0.2, ramp_s=5.0,
            run_id=f"soak{int(time.time()):x}{os.getpid():x}",
        )
        results = Results()
        load = asyncio.create_task(run_load(config, results=results))
        started = time.perf_counter()
        end_at = max(run_s - 2.0, warmup_s)
        moments = sorted({warmup_s, end_at, *(n * SAMPLE_S for n in range(int(end_at // SAMPLE_S) + 1))})
        samples: list[Sample] = []
        start = end = None
        for at in moments:
            await asyncio.wait([load], timeout=max(0.0, started + at - time.perf_counter()))
            if load.done():
                break
            samples.append(await asyncio.to_thread(sample, cluster, results, started))
            start = samples[-1] if at == warmup_s else start
            end = samples[-1]
            progress(f"{NAME}: {end.at_s:.0f} s, {end.accepted:,} messages, {end.keys:,} keys, Redis "
                     f"{end.used_memory / 2**20:.1f} MiB, RSS MiB " +
                     ", ".join(f"{n} {v / 1024:.0f}" for n, v in end.rss_kib.items()))
        _results, checker, wall_s = await load
        processes = len(cluster.gateways) + len(cluster.workers)
        exited = [s.name for s in [cluster.redis, *cluster.gateways, *cluster.workers] if not s.alive()]
    if start is None or end is None:
        raise BenchError(f"{NAME}: the load ended before the warm-up did")
    growth = {name: round(100.0 * (end.rss_kib[name] - kib) / kib, 1)
              for name, kib in start.rss_kib.items() if name in end.rss_kib and kib}
    return {
        "minutes": minutes,
        "warmup_s": warmup_s,
        "load_s": round(wall_s, 1),
        "clients": CLIENTS,
        "messages": results.messages,
        "accepted": results.accepted,
        "terminals": dict(results.terminals),
        "reconnects": results.reconnects,
        "violations": len(checker.violations),
        "violation_kinds": dict(checker.kinds),
        "start": start.__dict__,
        "end": end.__dict__,
        "rss_growth_pct": growth,
        "key_bound": key_bound(samples, end, CLIENTS, processes),
        "samples": [s.__dict__ for s in samples],
        "exited": exited,
    }


def run(quick: bool = False, minutes: float = 30.0) -> tuple[Figures, list[Row]]:
    minutes = 0.5 if quick else minutes
    progress(f"{NAME}: 2 gateways, 2 workers, {CLIENTS} clients for {minutes:g} min")
    figures = asyncio.run(_measure(minutes))
    return figures, rows(figures)


def rows(f: Figures) -> list[Row]:
    start, end, growth = f["start"], f["end"], f["rss_growth_pct"]
    window = f"{start['at_s']:.0f} s → {end['at_s']:.0f} s"
    out = [Row(NAME, f"messages accepted in {f['minutes']:g} min / protocol violations",
               f"{f['accepted']:,} / {f['violations']}", f"{f['reconnects']:,} drops and resumes", "- / 0",
               f["violations"] == 0)]
    for name in sorted(growth, key=lambda n: (n.startswith("redis"), n)):
        before, after = start["rss_kib"][name] / 1024, end["rss_kib"][name] / 1024
        own = not name.startswith("redis")
        out.append(Row(NAME, f"RSS of {name}, {window}", f"{before:.1f} → {after:.1f} MiB",
                       f"{growth[name]:+.1f}%", f"< +{RSS_GROWTH_GOAL_PCT:.0f}%" if own else "",
                       growth[name] < RSS_GROWTH_GOAL_PCT if own else None))
    out.append(Row(NAME, f"Redis keys, {window}", f"{start['keys']:,} → {end['keys']:,}",
                   f"lifetimes allow {f['key_bound']:,}", f"≤ {f['key_bound']:,}", end["keys"] <= f["key_bound"]))
    out.append(Row(NAME, f"Redis used_memory, {window}",
                   f"{start['used_memory'] / 2**20:.1f} → {end['used_memory'] / 2**20:.1f} MiB"))
    if f["exited"]:
        out.append(Row(NAME, "processes that exited during the run", ", ".join(f["exited"]), "", "none", False))
    return out
