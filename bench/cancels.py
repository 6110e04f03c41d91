"""The `cancels` client mode: Stop pressed on one gateway, `cancelled` awaited on another.

Each lane is one user with connection A on one gateway and B on the next. A starts a chat;
after `wait_chunks` chunks, B sends `cancel`; the latency is from sending the cancel on B to
`cancelled` arriving on A. Both connections run on `picows`, and every frame is stamped in
the transport's receive callback, before any Python queue or task switch: the figure is the
system's, with as little of the measuring client in it as a Python client allows.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from typing import Any

from picows import ws_connect

from bench.clientio import Frame, Listener, emit, next_command, stdin_lines, tokens_in


class Conn(Listener):
    """A connection whose frames, stamped on arrival, wait in a queue."""

    def __init__(self) -> None:
        super().__init__()
        self.queue: asyncio.Queue[tuple[float, Frame]] = asyncio.Queue()

    @classmethod
    async def open(cls, port: int, user: str) -> Conn:
        """Connect and authenticate (development mode: the user is named, no token)."""
        conn = cls()
        await ws_connect(lambda: conn, f"ws://127.0.0.1:{port}/ws", websocket_handshake_timeout=60)
        conn.send({"type": "auth", "user": user})
        _, reply = await conn.next(lambda f: True, 30)
        if reply.type != "auth_ok":
            raise ConnectionError(f"auth refused: {reply}")
        return conn

    def on_message(self, frame: Frame, stamp: float) -> None:
        self.queue.put_nowait((stamp, frame))

    async def next(self, want: Callable[[Frame], bool], timeout_s: float) -> tuple[float, Frame]:
        async with asyncio.timeout(timeout_s):
            while True:
                stamp, frame = await self.queue.get()
                if want(frame):
                    return stamp, frame

    async def close_and_wait(self) -> None:
        self.close()
        if self.transport is not None:
            await self.transport.wait_disconnected()


class CancelRun:
    def __init__(self, config: dict[str, Any]) -> None:
        self.total = int(config["cancels"])
        self.wait_chunks = int(config.get("wait_chunks", 3))
        self.max_tokens = int(config.get("max_tokens", 2000))
        self.timeout_s = float(config.get("timeout_s", 10.0))
        self.deadline = time.monotonic() + float(config.get("deadline_s", 120.0))
        self.started = 0
        self.latencies: list[float] = []
        self.result_latencies: list[float] = []
        self.after_cancel: list[int] = []
        self.statuses: dict[str, int] = {}
        self.failures: list[str] = []
        self.tokens = 0

    async def lane(self, lane: int, a: Conn, b: Conn) -> None:
        await asyncio.sleep(random.uniform(0.0, 0.2))  # lanes out of step with each other
        cycle = 0
        while self.started < self.total and time.monotonic() < self.deadline:
            self.started += 1
            cycle += 1
            try:
                await self.one(a, b, f"cancel-{lane}-{cycle}-{time.time_ns()}")
            except TimeoutError:
                self.failures.append(f"lane {lane}: timeout")

    async def one(self, a: Conn, b: Conn, session: str) -> None:
        a.send({"type": "chat", "session_id": session, "text": "count to a million",
                      "max_tokens": self.max_tokens})
        _, accepted = await a.next(lambda f: f.type in ("accepted", "error"), self.timeout_s)
        if accepted.type != "accepted" or accepted.message_id is None:
            self.failures.append(f"chat refused: {accepted.code}")
            return
        mid = accepted.message_id
        mine: Callable[[Frame], bool] = lambda f: f.message_id == mid  # noqa: E731
        chunks = 0
        while chunks < self.wait_chunks:
            _, frame = await a.next(mine, self.timeout_s)
            if frame.type != "chunk":
                self.failures.append(f"ended before the cancel: {frame.type}")
                return
            chunks += 1
            self.tokens += tokens_in(frame.text)
        await asyncio.sleep(random.uniform(0.0, 0.05))  # Stop is pressed at any point of a token
        sent = time.perf_counter()
        b.send({"type": "cancel", "message_id": mid})
        late = 0
        while True:
            stamp, frame = await a.next(mine, self.timeout_s)
            if frame.type == "chunk":
                late += 1
                self.tokens += tokens_in(frame.text)
                continue
            if frame.type != "cancelled":
                self.failures.append(f"ended {frame.type}, not cancelled")
                return
            self.latencies.append(stamp - sent)
            self.after_cancel.append(late)
            break
        stamp, result = await b.next(lambda f: f.type == "cancel_result" and f.message_id == mid, self.timeout_s)
        self.result_latencies.append(stamp - sent)
        status = result.status or "?"
        self.statuses[status] = self.statuses.get(status, 0) + 1


async def cancels(config: dict[str, Any]) -> None:
    commands = await stdin_lines()
    ports: list[int] = [int(p) for p in config["ports"]]
    run = CancelRun(config)
    pairs: list[tuple[Conn, Conn]] = []
    for lane in range(int(config.get("lanes", 4))):
        user = f"canceller{lane}"
        a = await Conn.open(ports[lane % len(ports)], user)
        b = await Conn.open(ports[(lane + 1) % len(ports)], user)
        pairs.append((a, b))
    emit("ready", {"lanes": len(pairs)})
    try:
        if await next_command(commands) != "go":
            return
        started = time.perf_counter()
        run.deadline = time.monotonic() + float(config.get("deadline_s", 120.0))
        await asyncio.gather(*(run.lane(i, a, b) for i, (a, b) in enumerate(pairs)))
        emit("result", {
            "latencies_s": run.latencies,
            "cancel_result_s": run.result_latencies,
            "chunks_after_cancel": run.after_cancel,
            "statuses": run.statuses,
            "failures": run.failures[:20],
            "failure_count": len(run.failures),
            "tokens": run.tokens,
            "elapsed_s": time.perf_counter() - started,
        })
        await next_command(commands)
    finally:
        await asyncio.gather(*(c.close_and_wait() for pair in pairs for c in pair), return_exceptions=True)
