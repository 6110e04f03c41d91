"""The hot paths' Redis client on one Redis and on a Redis Cluster: the lean clients
(`store.lean.LeanClient`, `store.cluster.ClusterClient`) against redis-py's
(`redis.asyncio.Redis`, `redis.asyncio.RedisCluster`), pipelines of EVALSHA as the worker's
chunk writer sends them (one batch in flight at a time) and single calls as a cancel is.

The script touches two keys of one hash tag (a counter and a stream trimmed to 100 entries),
as the product's per-message scripts do; 64 messages spread over every master. This process
(uvloop) is the client: CPU per command is its own CPU time over the commands it sent, so the
servers' work is not in it; commands/s is wall-clock with one batch in flight (the servers
share the machine's cores with the client).
"""

from __future__ import annotations

import asyncio
import hashlib
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
import uvloop
from redis.connection import parse_url

from bench.cluster import Figures, Row, progress, start_redis
from bench.stats import percentiles
from store import embedded
from store.cluster import ClusterClient
from store.lean import LeanClient
from store.redis_store import connect

NAME = "cluster_clients"
SCRIPT = """
redis.call('HINCRBY', KEYS[1], 'n', 1)
redis.call('XADD', KEYS[2], 'MAXLEN', '~', 100, '*', 'f', ARGV[1])
return 1
"""
SHA = hashlib.sha1(SCRIPT.encode()).hexdigest()
MESSAGES = 64
FRAME = '{"type":"chunk","message_id":"m","seq":1,"text":"hello "}'
BATCHES = (1, 32, 512)

Send = Callable[[int, int], Awaitable[None]]
"""(first command's number, batch size) → one batch sent and answered."""


def command(n: int) -> tuple[str | int, ...]:
    tag = f"{{bench{n % MESSAGES}}}"
    return ("EVALSHA", SHA, 2, f"{tag}:meta", f"{tag}:log", FRAME)


def _lean(client: LeanClient | ClusterClient) -> Send:
    async def send(first: int, size: int) -> None:
        replies = await client.execute([command(n) for n in range(first, first + size)])
        assert replies[-1] == 1, replies[-1]

    return send


def _redis_py(client: aioredis.Redis | aioredis.RedisCluster) -> Send:
    """redis-py's cluster pipeline refuses its `evalsha` method ("blocked when running redis
    in cluster mode"); `execute_command` routes EVALSHA by its first key on both clients."""

    async def send(first: int, size: int) -> None:
        if size == 1:
            reply = await client.execute_command(*command(first))
            assert reply == 1, reply
            return
        pipe = client.pipeline()
        for n in range(first, first + size):
            pipe.execute_command(*command(n))
        replies = await pipe.execute()
        assert replies[-1] == 1, replies[-1]

    return send


async def _measure(send: Send, size: int, commands: int) -> dict[str, Any]:
    for first in range(0, 5 * size, size):  # warm up: connections, slot maps
        await send(first, size)
    latencies: list[float] = []
    cpu, wall = time.process_time(), time.perf_counter()
    for first in range(0, commands, size):
        began = time.perf_counter()
        await send(first, size)
        latencies.append(time.perf_counter() - began)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    sent = len(latencies) * size
    return {
        "commands": sent,
        "cpu_us_per_command": round(1e6 * cpu / sent, 2),
        "commands_per_s": round(sent / wall),
        "batch_latency": percentiles(latencies),
    }


async def _clients(single_url: str, cluster_url: str) -> dict[str, tuple[Send, Callable[[], Awaitable[None]]]]:
    lean = LeanClient(parse_url(single_url))  # type: ignore[no-untyped-call]
    lean_cluster = ClusterClient(parse_url(cluster_url))  # type: ignore[no-untyped-call]
    redis_py = connect(single_url)
    redis_py_cluster = aioredis.RedisCluster.from_url(cluster_url)
    await redis_py.script_load(SCRIPT)
    await redis_py_cluster.script_load(SCRIPT)  # on every master
    return {
        "single/lean": (_lean(lean), lean.close),
        "single/redis-py": (_redis_py(redis_py), redis_py.aclose),
        "cluster/lean": (_lean(lean_cluster), lean_cluster.close),
        "cluster/redis-py": (_redis_py(redis_py_cluster), redis_py_cluster.aclose),
    }


async def _run(single_url: str, cluster_url: str, quick: bool) -> Figures:
    clients = await _clients(single_url, cluster_url)
    figures: Figures = {}
    try:
        for size in BATCHES:
            commands = (200 if quick else 6_000) if size == 1 else (2_000 if quick else 60_000)
            for name, (send, _close) in clients.items():
                result = await _measure(send, size, commands)
                figures.setdefault(name, {})[str(size)] = result
                progress(f"{NAME}: {name} batch {size}: {result['cpu_us_per_command']} µs CPU/command, "
                         f"{result['commands_per_s']} commands/s, batch p50 {result['batch_latency']['p50']} ms "
                         f"p99 {result['batch_latency']['p99']} ms")
    finally:
        for _send, close in clients.values():
            await close()
    return figures


def run(quick: bool = False) -> tuple[Figures, list[Row]]:
    with tempfile.TemporaryDirectory(prefix="tokenrelay-bench-cluster-clients-") as tmp:
        port = embedded.free_port()
        proc, _log = start_redis(port, Path(tmp))
        cluster = None
        try:
            cluster = embedded.start_cluster(Path(tmp) / "cluster")
            figures = uvloop.run(_run(f"redis://127.0.0.1:{port}/0", cluster.url, quick))
        finally:
            if cluster is not None:
                cluster.stop()
            proc.kill()
            proc.wait()
    rows: list[Row] = []
    for size in map(str, BATCHES):
        for target in ("single", "cluster"):
            lean, other = figures[f"{target}/lean"][size], figures[f"{target}/redis-py"][size]
            rows.append(Row(
                NAME,
                f"{target}: batch of {size} EVALSHA, CPU per command; commands/s",
                f"{lean['cpu_us_per_command']:.1f} µs; {lean['commands_per_s']:,} (lean)",
                f"redis-py {other['cpu_us_per_command']:.1f} µs; {other['commands_per_s']:,}",
            ))
    single, cluster_one = figures["single/lean"]["1"], figures["cluster/lean"]["1"]
    rows.append(Row(
        NAME, "one EVALSHA round trip (a cancel), p50 / p99",
        f"{cluster_one['batch_latency']['p50']:.3f} / {cluster_one['batch_latency']['p99']:.3f} ms (cluster, lean)",
        f"single {single['batch_latency']['p50']:.3f} / {single['batch_latency']['p99']:.3f} ms",
    ))
    return figures, rows
