"""Memory of idle connections: RSS of one gateway before and after 5,000 idle WebSockets.

A client process opens the connections (authenticated, then one heartbeat every 10 s each, at
random phases) and holds them for a little over one heartbeat period; the gateway's VmRSS
(/proc/PID/status) is read before the first connection and while all are open. The clients
offer permessage-deflate, as browsers do; whether the gateway accepted it (a zlib context per
connection, tens of KiB) is reported beside the figure.
"""

from __future__ import annotations

import asyncio
from typing import Any

from bench.cluster import Cluster, Figures, Row, progress, rss_kib

NAME = "idle_memory"
HEARTBEAT_S = 10.0


async def _one(cluster: Cluster, connections: int, hold_s: float, compression: str | None) -> dict[str, Any]:
    gateway = cluster.add_gateway()
    await cluster.wait_ready()
    await asyncio.sleep(1.0)
    before = rss_kib(gateway.pid)
    client = await cluster.client("idle", {"port": gateway.port, "connections": connections,
                                           "heartbeat_s": HEARTBEAT_S, "compression": compression,
                                           "connect_concurrency": 100})
    ready = await client.expect("ready", timeout_s=300)
    await asyncio.sleep(hold_s)
    after = rss_kib(gateway.pid)
    report = await client.request("report", "report")
    await client.finish(120)
    await cluster.stop_gateway(gateway)
    connected = int(ready["connected"])
    return {
        "connections": connected,
        "failures": ready["failures"],
        "ramp_s": ready["ramp_s"],
        "rss_before_kib": before,
        "rss_after_kib": after,
        "kib_per_connection": (after - before) / connected if connected else 0.0,
        "open_at_end": report["open"],
        "heartbeats_sent": report["heartbeats_sent"],
        "heartbeat_acks": report["acks"],
        "heartbeat_rtt_ms": report["heartbeat_rtt"],
        "extensions": ready["extensions"],
    }


async def _measure(quick: bool) -> dict[str, Any]:
    connections, hold_s = (200, 2.0) if quick else (5000, HEARTBEAT_S + 2.0)
    async with Cluster(NAME) as cluster:
        figures = await _one(cluster, connections, hold_s, "deflate")
        figures["heartbeat_s"] = HEARTBEAT_S
    progress(f"{NAME}: {figures['kib_per_connection']:.1f} KiB per connection")
    return figures


def run(quick: bool = False) -> tuple[Figures, list[Row]]:
    progress(f"{NAME}: idle WebSocket connections on one gateway")
    figures = asyncio.run(_measure(quick))
    rss = f"{figures['rss_before_kib'] / 1024:.0f} → {figures['rss_after_kib'] / 1024:.0f} MiB"
    rows = [
        Row(NAME, f"KiB per idle connection ({figures['connections']:,} open)",
            f"{figures['kib_per_connection']:.1f} KiB", f"gateway RSS {rss}", "", None),
        Row(NAME, "WebSocket extensions negotiated (client offers deflate)",
            figures["extensions"] or "none", "", "", None),
        Row(NAME, "heartbeats answered while idle",
            f"{figures['heartbeat_acks']:,} / {figures['heartbeats_sent']:,}",
            f"p99 RTT {figures['heartbeat_rtt_ms']['p99']:.1f} ms", "", None),
    ]
    return figures, rows
