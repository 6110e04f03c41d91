"""What a published frame costs the Redis servers: one Redis, a 6.2 cluster (PUBLISH is
broadcast to every node over the cluster bus) and a Redis 7 cluster (PUBLISH, and sharded
SPUBLISH, which reaches only the channel's master and its replica).

As the product publishes: from a script (EVALSHA, the channel in KEYS, so a cluster runs it
on the channel's master), 300 channels, each with one subscriber (three subscriber
connections, as three gateways). The figure is the CPU time of every server process (from
/proc) over a burst, per message, less the same burst of a script that publishes nothing:
what the publish itself costs, everywhere it lands (also per node: on a 6.2 cluster every
node pays for every message). Redis 7 is Debian's `redis-server`
(`apt-get install redis-server`); without one only 6.2 is measured, and the table says so.
"""

from __future__ import annotations

import asyncio
import hashlib
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop
from redis.connection import parse_url

from bench.cluster import Figures, Row, cpu_seconds, progress
from store import embedded
from store.cluster import ClusterClient, CommandClient
from store.cluster_subscriber import ClusterSubscriber
from store.lean import LeanClient
from store.subscriber import Subscriber

NAME = "cluster_pubsub"
CHANNELS = [f"tr:{{p{i}}}:live:m{i}" for i in range(300)]
FRAME = b'{"type":"chunk","message_id":"m","seq":1,"text":"hello "}'
SCRIPTS = {
    "none": "return 1",
    "PUBLISH": "return redis.call('PUBLISH', KEYS[1], ARGV[1])",
    "SPUBLISH": "return redis.call('SPUBLISH', KEYS[1], ARGV[1])",
}
BATCH = 512


class _Counter:
    def __init__(self) -> None:
        self.count = 0
        self.reached = asyncio.Event()
        self.goal = 0

    def __call__(self, _channel: bytes, _data: bytes) -> None:
        self.count += 1
        if self.count >= self.goal:
            self.reached.set()


async def _burst(client: CommandClient, script: str, messages: int, counter: _Counter, pids: list[int]) -> list[float]:
    """CPU seconds of each server process for `messages` script calls (one batch in flight),
    once every published message arrived."""
    sha = hashlib.sha1(SCRIPTS[script].encode()).hexdigest()
    counter.count, counter.goal = 0, messages if script != "none" else 0
    counter.reached.clear()
    before = [cpu_seconds(pid) for pid in pids]
    for first in range(0, messages, BATCH):
        batch = [("EVALSHA", sha, 1, CHANNELS[n % len(CHANNELS)], FRAME) for n in range(first, min(first + BATCH, messages))]
        replies = await client.execute(batch)
        if any(isinstance(r, Exception) for r in replies):
            raise RuntimeError(f"{script}: {next(r for r in replies if isinstance(r, Exception))}")
    if script != "none":
        await asyncio.wait_for(counter.reached.wait(), 60)
    await asyncio.sleep(0.05)  # the bus messages of the last batch reach the other nodes
    return [cpu_seconds(pid) - b for pid, b in zip(pids, before)]


async def _target(url: str, cluster: bool, sharded: bool, scripts: list[str], messages: int, pids: list[int]) -> dict[str, Any]:
    counter = _Counter()
    client: CommandClient
    subscribers: list[Subscriber | ClusterSubscriber] = []
    if cluster:
        client = ClusterClient(parse_url(url))  # type: ignore[no-untyped-call]
        await client.refresh()
        masters = client.masters()
    else:
        client = LeanClient(parse_url(url))  # type: ignore[no-untyped-call]
        masters = []
    try:
        for host, port in masters or [(str(parse_url(url)["host"]), int(parse_url(url)["port"]))]:  # type: ignore[no-untyped-call]
            loader = LeanClient(parse_url(f"redis://{host}:{port}/0"))  # type: ignore[no-untyped-call]
            await loader.execute([("SCRIPT", "LOAD", script) for script in SCRIPTS.values()])
            await loader.close()
        for i in range(3):  # three gateways, each watching a third of the messages
            if sharded:
                subscriber: Subscriber | ClusterSubscriber = await ClusterSubscriber.open(url, counter)
            else:
                host, port = masters[i % len(masters)] if masters else ("127.0.0.1", int(parse_url(url)["port"]))  # type: ignore[no-untyped-call]
                subscriber = await Subscriber.open(f"redis://{host}:{port}/0", counter)
            subscribers.append(subscriber)
            assert await subscriber.subscribe(*CHANNELS[i::3])
        await _burst(client, scripts[-1], min(messages, 2_000), counter, pids)  # warm up
        cpu = {script: await _burst(client, script, messages, counter, pids) for script in ["none", *scripts]}
    finally:
        for subscriber in subscribers:
            subscriber.close()
        await client.close()
    def per_message(seconds: float) -> float:
        return round(1e6 * seconds / messages, 2)

    figures: dict[str, Any] = {"script_node_cpu_us_per_message": per_message(sum(cpu["none"])), "messages": messages}
    for script in scripts:
        each = [per_message(a - b) for a, b in zip(cpu[script], cpu["none"])]
        figures[f"{script}_node_cpu_us_per_message"] = round(sum(each), 2)
        figures[f"{script}_each_node_us_per_message"] = each
    return figures


def _measure(tmp: Path, quick: bool) -> Figures:
    messages = 5_000 if quick else 100_000
    figures: Figures = {}
    port = embedded.free_port()
    single = embedded.start(port, tmp / "single", extra=["--logfile", str(tmp / "single.log")])
    try:
        figures["single 6.2"] = uvloop.run(
            _target(f"redis://127.0.0.1:{port}/0", False, False, ["PUBLISH"], messages, [single.pid])
        )
    finally:
        single.kill()
        single.wait()
    servers = [("6.2", "")]
    redis7 = embedded.redis7_server()
    if redis7 is not None:
        servers.append(("7", redis7))
    for version, server in servers:
        cluster = embedded.start_cluster(tmp / f"cluster-{version}", server=server)
        try:
            pids = [node.proc.pid for node in cluster.nodes]
            figures[f"cluster {version}"] = uvloop.run(
                _target(cluster.url, True, False, ["PUBLISH"], messages, pids)
            )
            if version == "7":
                figures["cluster 7 sharded"] = uvloop.run(
                    _target(cluster.url, True, True, ["SPUBLISH"], messages, pids)
                )
        finally:
            cluster.stop()
    for name, result in figures.items():
        progress(f"{NAME}: {name}: {result}")
    figures["redis7_available"] = redis7 is not None
    return figures


def run(quick: bool = False) -> tuple[Figures, list[Row]]:
    with tempfile.TemporaryDirectory(prefix="tokenrelay-bench-cluster-pubsub-") as tmp:
        began = time.monotonic()
        figures = _measure(Path(tmp), quick)
        figures["measure_s"] = round(time.monotonic() - began, 1)
    def cost(name: str, command: str) -> str:
        """All nodes' CPU per message (the busiest node's)."""
        result = figures[name]
        return (f"{result[f'{command}_node_cpu_us_per_message']:.1f} µs "
                f"({max(result[f'{command}_each_node_us_per_message']):.1f} busiest)")

    rows = [
        Row(NAME, "server CPU per published message, all nodes (busiest): 6.2 cluster PUBLISH",
            cost("cluster 6.2", "PUBLISH"), f"one Redis {cost('single 6.2', 'PUBLISH')}"),
    ]
    if figures["redis7_available"]:
        rows.append(Row(NAME, "… Redis 7 cluster: SPUBLISH (sharded) vs PUBLISH",
                        cost("cluster 7 sharded", "SPUBLISH"), f"PUBLISH {cost('cluster 7', 'PUBLISH')}"))
    else:
        rows.append(Row(NAME, "Redis 7 cluster (SPUBLISH)", "not measured", "no redis-server 7 on PATH"))
    return figures, rows
