"""What the chunk writes cost Redis alone, one Redis + replica against a 3-master cluster with a
replica each: where a cluster's extra cost per token comes from on one machine.

The writes are the product's (`Store.append_command` on the lean client, one subscriber on
every live channel as a gateway has), sent as the workers send them at their default pace: a
batch every 2 ms (two workers at 4 ms), at a steady rate. Measured: the CPU of every server
process per chunk write, for one Redis at the whole rate and at a third of it (what each master
of the cluster carries), and for the cluster at the whole rate. From one Redis's two rates the
cost of a round trip (its wake-ups, reads and writes, the replica's included) and of a write
are fitted; with them, a cluster that splits every batch into one round trip per master
should cost `trips × masters × round trip + writes × write`. Redis 7 (Debian's
`redis-server`) when there is one, else the embedded 6.2.
"""

from __future__ import annotations

import asyncio
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import redis
import uvloop

from bench.cluster import Figures, Row, cpu_seconds, progress
from protocol.ids import new_message_id
from store import embedded, keys
from store.redis_store import Store
from store.topology import discover

NAME = "cluster_trips"
INTERVAL_S = 0.002
"""A batch every 2 ms: two workers at the default `--write-pace-ms 4`."""
MESSAGES = 300
RATE = 6_000
FRAME = '{"type":"chunk","message_id":"m","seq":1,"text":"hello "}'


async def _load(url: str, cluster: bool, pids: list[int], rate: float, seconds: float) -> dict[str, Any]:
    """Chunk writes at `rate` per second for `seconds`: CPU of each server process per write."""
    topology = await discover(url, cluster=cluster)
    store = Store.open(topology)
    received = 0

    def counted(_channel: bytes, _data: bytes) -> None:
        nonlocal received
        received += 1

    subscriber = await topology.subscriber(counted)
    try:
        await store.load_append_script()
        tags = store.keyspace.tags
        mids = [new_message_id(tags[n % len(tags)]) for n in range(MESSAGES)]
        for mid in mids:
            await store.lean.call("HSET", keys.meta(mid), "state", "running", "worker", "w", "attempt", 1, "last_seq", 0)
        assert await subscriber.subscribe(*[keys.live_channel(mid) for mid in mids])
        seqs = dict.fromkeys(mids, 0)
        per_batch, owed, writes, n = rate * INTERVAL_S, 0.0, 0, 0
        before = [cpu_seconds(pid) for pid in pids]
        loop = asyncio.get_running_loop()
        start = next_at = loop.time()
        while loop.time() - start < seconds:
            owed += per_batch
            batch = []
            while owed >= 1:
                mid = mids[n % MESSAGES]
                n, owed = n + 1, owed - 1
                seqs[mid] += 1
                batch.append(store.append_command(mid, "w", 1, seqs[mid], FRAME))
            if batch:
                replies = await store.lean.execute(batch)
                if any(reply != 1 for reply in replies):
                    raise RuntimeError(f"a chunk write was refused: {replies[:5]}")
                writes += len(batch)
            next_at += INTERVAL_S
            await asyncio.sleep(max(0.0, next_at - loop.time()))
        elapsed = loop.time() - start
        deadline = time.monotonic() + 10
        while received < writes and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        used = [cpu_seconds(pid) - b for pid, b in zip(pids, before)]
    finally:
        subscriber.close()
        await store.lean.close()
        await store.redis.aclose()
    return {
        "writes": writes, "writes_per_s": round(writes / elapsed), "delivered": received,
        "us_per_write": round(1e6 * sum(used) / writes, 2),
        "us_per_write_by_node": [round(1e6 * u / writes, 2) for u in used],
    }


def _single(tmp: Path, server: str) -> tuple[str, list[subprocess.Popen[bytes]]]:
    """One Redis and its replica."""
    port, replica_port = embedded.free_port(), embedded.free_port()
    procs: list[subprocess.Popen[bytes]] = []
    for p, extra in ((port, []), (replica_port, ["--replicaof", "127.0.0.1", str(port)])):
        (tmp / str(p)).mkdir(parents=True)
        procs.append(subprocess.Popen([*embedded.server_command(p, tmp / str(p), server=server), *extra]))
        embedded.wait_ready(p, proc=procs[-1])
    replica = redis.Redis(port=replica_port)
    deadline = time.monotonic() + 30
    while replica.info("replication").get("master_link_status") != "up":
        if time.monotonic() > deadline:
            raise RuntimeError("the replica did not connect")
        time.sleep(0.05)
    replica.close()
    return f"redis://127.0.0.1:{port}/0", procs


def _measure(tmp: Path, quick: bool) -> Figures:
    seconds = 1.0 if quick else 8.0
    rate = 600 if quick else RATE
    server = embedded.redis7_server() or ""
    figures: Figures = {"server": "7" if server else "6.2", "rate": rate, "batches_per_s": round(1 / INTERVAL_S)}
    url, procs = _single(tmp / "single", server)
    try:
        pids = [proc.pid for proc in procs]
        figures["single"] = uvloop.run(_load(url, False, pids, rate, seconds))
        figures["single_third"] = uvloop.run(_load(url, False, pids, rate / 3, seconds))
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    cluster = embedded.start_cluster(tmp / "cluster", server=server)
    try:
        figures["cluster"] = uvloop.run(_load(cluster.url, True, [n.proc.pid for n in cluster.nodes], rate, seconds))
        figures["masters"] = len(cluster.masters())
    finally:
        cluster.stop()
    figures.update(_fitted(figures))
    for name in ("single", "single_third", "cluster"):
        progress(f"{NAME}: {name}: {figures[name]}")
    return figures


def _fitted(figures: Figures) -> dict[str, float]:
    """A round trip's and a write's cost from one Redis's two rates (the same round trips per
    second, a third of the writes), and what the cluster should cost by them."""
    trips = figures["batches_per_s"]
    whole, third = figures["single"], figures["single_third"]
    cost_whole = whole["us_per_write"] * whole["writes_per_s"]
    cost_third = third["us_per_write"] * third["writes_per_s"]
    write = (cost_whole - cost_third) / (whole["writes_per_s"] - third["writes_per_s"])
    trip = (cost_whole - write * whole["writes_per_s"]) / trips
    writes = figures["cluster"]["writes_per_s"]
    predicted = (trips * figures["masters"] * trip + writes * write) / writes
    return {"round_trip_us": round(trip, 1), "write_us": round(write, 2), "cluster_predicted_us_per_write": round(predicted, 2)}


def run(quick: bool = False) -> tuple[Figures, list[Row]]:
    with tempfile.TemporaryDirectory(prefix="tokenrelay-bench-cluster-trips-") as tmp:
        began = time.monotonic()
        figures = _measure(Path(tmp), quick)
        figures["measure_s"] = round(time.monotonic() - began, 1)
    single, third, cluster = figures["single"], figures["single_third"], figures["cluster"]
    version = figures["server"]
    rows = [
        Row(NAME, f"Redis {version} CPU per chunk write, every node: {figures['masters']}+{figures['masters']} cluster vs "
                  f"one Redis + replica ({figures['rate']:,}/s in {figures['batches_per_s']} batches/s)",
            f"{cluster['us_per_write']:.1f} µs", f"one Redis {single['us_per_write']:.1f} µs "
                                                 f"({cluster['us_per_write'] / single['us_per_write']:.2f}×)"),
        Row(NAME, "… one Redis + replica at a third of the rate (a master's share), same batches/s",
            f"{third['us_per_write']:.1f} µs", f"cluster {cluster['us_per_write']:.1f} µs"),
        Row(NAME, "… fitted: a round trip (master + replica), a write",
            f"{figures['round_trip_us']:.0f} µs, {figures['write_us']:.1f} µs",
            f"cluster predicted {figures['cluster_predicted_us_per_write']:.1f} µs"),
    ]
    return figures, rows
