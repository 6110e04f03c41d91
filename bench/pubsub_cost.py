"""What one pub/sub message costs the gateway: redis-py's `PubSub` against `store.subscriber`.

Every chunk and every `cancelled` a gateway relays arrives as a pub/sub message, so this is
a per-frame cost of the relay and a step of the cancel path. A publisher process sends
messages to one channel; the receiving process (this one, uvloop) counts them:
- CPU per message: process CPU time over a burst of messages (pipelined by the publisher);
- latency: one message every 10 ms (the receiver idles in between, as a quiet gateway
  does), from PUBLISH sent to the message handed to the application, one clock
  (`time.time`) on one machine.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis as sync_redis
import uvloop

from bench.cluster import Figures, Row, progress, start_redis
from bench.stats import percentiles
from store import embedded
from store.redis_store import connect
from store.subscriber import Subscriber

NAME = "pubsub_cost"
CHANNEL = "bench:pubsub"
END = b"end"


def _publish(url: str, burst: int, spaced: int, gap_s: float, start: Any, drained: Any) -> None:
    client = sync_redis.Redis.from_url(url)
    start.wait()
    with client.pipeline(transaction=False) as pipe:
        for i in range(burst):
            pipe.publish(CHANNEL, b"x" * 80)
            if i % 500 == 499:
                pipe.execute()
        pipe.execute()
    client.publish(CHANNEL, END)
    drained.wait()
    for _ in range(spaced):
        time.sleep(gap_s)
        client.publish(CHANNEL, repr(time.time()).encode())
    client.publish(CHANNEL, END)
    client.close()


class _Receiver:
    """Counts the burst, then stamps the spaced messages."""

    def __init__(self, drained: Any) -> None:
        self._drained = drained
        self.burst_cpu_s = 0.0
        self.burst = 0
        self.latencies: list[float] = []
        self.phase = 0
        self.first_cpu: float | None = None
        self.done = asyncio.Event()

    def on_message(self, data: bytes) -> None:
        if self.phase == 0:
            if self.first_cpu is None:
                self.first_cpu = time.process_time()
            if data == END:
                self.burst_cpu_s = time.process_time() - self.first_cpu
                self.phase = 1
                self._drained.set()
            else:
                self.burst += 1
        elif data == END:
            self.done.set()
        else:
            self.latencies.append(time.time() - float(data))


async def _redis_py(url: str, receiver: _Receiver, subscribed: Callable[[], None]) -> None:
    client = connect(url, timeout_s=None)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(CHANNEL)
    subscribed()
    while not receiver.done.is_set():
        message = await pubsub.get_message(timeout=None)
        if message is not None and message["type"] == "message":
            receiver.on_message(message["data"])
    await pubsub.aclose()  # type: ignore[no-untyped-call]
    await client.aclose()


async def _lean(url: str, receiver: _Receiver, subscribed: Callable[[], None]) -> None:
    subscriber = await Subscriber.open(url, lambda _channel, data: receiver.on_message(data))
    await subscriber.subscribe(CHANNEL)
    subscribed()
    await receiver.done.wait()
    subscriber.close()


async def _one(url: str, how: str, burst: int, spaced: int) -> dict[str, Any]:
    spawn = multiprocessing.get_context("spawn")
    start, drained = spawn.Event(), spawn.Event()
    receiver = _Receiver(drained)
    publisher = spawn.Process(target=_publish, args=(url, burst, spaced, 0.01, start, drained))
    publisher.start()
    run = _redis_py if how == "redis-py" else _lean
    try:
        await asyncio.wait_for(run(url, receiver, start.set), timeout=120)
    finally:
        publisher.join(10)
    return {
        "messages": receiver.burst,
        "cpu_us_per_message": 1e6 * receiver.burst_cpu_s / max(1, receiver.burst),
        "latency": percentiles(receiver.latencies),
    }


async def _measure(url: str, quick: bool) -> Figures:
    burst, spaced = (2_000, 20) if quick else (100_000, 300)
    figures: Figures = {}
    for how in ("redis-py", "subscriber"):
        figures[how] = await _one(url, how, burst, spaced)
        f = figures[how]
        progress(f"{NAME}: {how}: {f['cpu_us_per_message']:.1f} µs CPU/message, "
                 f"latency p50 {f['latency']['p50']:.3f} ms p99 {f['latency']['p99']:.3f} ms")
    return figures


def run(quick: bool = False) -> tuple[Figures, list[Row]]:
    with tempfile.TemporaryDirectory(prefix="tokenrelay-bench-pubsub-") as tmp:
        port = embedded.free_port()
        proc, _log = start_redis(port, Path(tmp))
        try:
            figures = uvloop.run(_measure(f"redis://127.0.0.1:{port}/0", quick))
        finally:
            proc.kill()
            proc.wait()
    old, new = figures["redis-py"], figures["subscriber"]
    rows = [
        Row(NAME, "CPU per pub/sub message received", f"{new['cpu_us_per_message']:.1f} µs (store.subscriber)",
            f"redis-py PubSub {old['cpu_us_per_message']:.1f} µs"),
        Row(NAME, "PUBLISH → handler, one message every 10 ms, p50 / p99",
            f"{new['latency']['p50']:.3f} / {new['latency']['p99']:.3f} ms",
            f"redis-py {old['latency']['p50']:.3f} / {old['latency']['p99']:.3f} ms"),
    ]
    return figures, rows
