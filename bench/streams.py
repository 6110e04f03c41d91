"""The `streams` client mode: many long streams, as cheap to receive as a client can make them.

The load generator shares the 2-core machine with the system it measures, so every cycle it
spends parsing frames is taken from the gateways, workers and Redis. It therefore runs on
`picows` (a WebSocket protocol implemented in Cython) with one `WSListener` per connection:
each frame is handled in the transport's callback, with no reader task, no message queue and
no `await` per frame. It speaks the same protocol as any client: auth, then one `chat`, then
chunks up to the terminal event; pings are answered by the library, and `stop` sends a
`cancel` for every stream still running.
"""

from __future__ import annotations

import asyncio
import time
from array import array
from typing import Any

from picows import WSTransport, ws_connect

from bench.clientio import TERMINALS, Frame, Listener, emit, next_command, stdin_lines, tokens_in
from bench.stats import percentiles


class Stream(Listener):
    """One connection, one long chat; frames are counted as they arrive."""

    def __init__(self, run: StreamRun, index: int) -> None:
        super().__init__()
        self.run = run
        self.index = index
        self.message_id: str | None = None
        self.last: float | None = None
        self.terminal: str | None = None
        self.refused: str | None = None
        self.cancelling = False
        self.closed = asyncio.Event()

    def on_ws_connected(self, transport: WSTransport) -> None:
        super().on_ws_connected(transport)
        self.send({"type": "auth", "user": f"load{self.index % self.run.users}"})

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if self.terminal is None and self.refused is None:
            self.refused = "disconnected"
            if self.last is None:
                self.run.settled_one()
            self.run.over_one()
        self.closed.set()

    def on_message(self, frame: Frame, stamp: float) -> None:
        self.run.on_frame(self, frame)


class StreamRun:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.loop = asyncio.get_running_loop()
        self.ports: list[int] = [int(p) for p in config["ports"]]
        self.max_tokens = int(config.get("max_tokens", 2000))
        self.users = max(500, -(-int(config["streams"]) // 4))
        """Users the streams are spread over: at most 4 streams each, well inside the gateways'
        limits (8 generations per user), however many streams a step has."""
        self.ramp_per_s = float(config.get("ramp_per_s", 0))
        self.streams = [Stream(self, i) for i in range(int(config["streams"]))]
        self.recording = False
        self.gaps: array[float] = array("d")
        self.tokens = 0
        self.tokens_total = 0
        self.first_chunk = 0
        self.ended_early = 0
        self.connect_failures: list[str] = []
        self.all_started = asyncio.Event()
        self.finished = asyncio.Event()
        self.settled = 0
        self.over = 0
        self.mark_at = time.perf_counter()
        self._gate = asyncio.Semaphore(int(config.get("connect_concurrency", 100)))

    def settled_one(self) -> None:
        """A stream got its first chunk, or will never get one."""
        self.settled += 1
        if self.settled >= len(self.streams):
            self.all_started.set()

    def over_one(self) -> None:
        """A stream ended (terminal event, refusal or no connection)."""
        self.over += 1
        if self.over >= len(self.streams):
            self.finished.set()

    def refused(self) -> int:
        return sum(1 for s in self.streams if s.refused is not None)

    def on_frame(self, stream: Stream, frame: Frame) -> None:
        now = self.loop.time()
        match frame.type:
            case "chunk":
                count = tokens_in(frame.text)
                self.tokens_total += count
                if self.recording:
                    self.tokens += count
                    if stream.last is not None:
                        self.gaps.append(now - stream.last)
                if stream.last is None:
                    self.first_chunk += 1
                    self.settled_one()
                stream.last = now
            case "auth_ok":
                stream.send({
                    "type": "chat", "session_id": f"load-{stream.index}-{time.time_ns()}",
                    "text": "tell me a very long story", "max_tokens": self.max_tokens,
                })
            case "accepted":
                stream.message_id = frame.message_id
            case kind if kind in TERMINALS and frame.message_id is not None:
                if stream.terminal is None:
                    stream.terminal = kind
                    if not stream.cancelling:
                        self.ended_early += 1
                    if stream.last is None:
                        self.settled_one()
                    self.over_one()
            case "error" if stream.refused is None and stream.terminal is None:  # refused: auth, overloaded, ...
                stream.refused = frame.code or "error"
                self.settled_one()
                self.over_one()
            case _:
                pass

    async def run_one(self, stream: Stream) -> None:
        if self.ramp_per_s > 0:
            await asyncio.sleep(stream.index / self.ramp_per_s)
        port = self.ports[stream.index % len(self.ports)]
        try:
            async with self._gate:
                await ws_connect(lambda: stream, f"ws://127.0.0.1:{port}/ws", websocket_handshake_timeout=60,
                                 max_frame_size=1 << 20)
        except Exception as exc:  # OSError, a timeout, or picows's own handshake errors
            self.connect_failures.append(repr(exc)[:200])
            stream.refused = "no connection"
            self.settled_one()
            self.over_one()

    def mark(self) -> None:
        self.recording = True
        self.tokens = 0
        self.gaps = array("d")
        self.mark_at = time.perf_counter()

    def report(self) -> dict[str, Any]:
        self.recording = False
        elapsed = time.perf_counter() - self.mark_at
        live = sum(1 for s in self.streams if s.last is not None and s.terminal is None)
        return {
            "elapsed_s": elapsed,
            "tokens": self.tokens,
            "tokens_total": self.tokens_total,
            "gaps": percentiles(self.gaps),
            "gap_count": len(self.gaps),
            "gaps_over_100ms": sum(1 for g in self.gaps if g > 0.1),
            "live": live,
            "ended_early": self.ended_early,
            "refused": self.refused(),
            "connect_failures": len(self.connect_failures),
        }

    async def stop(self) -> dict[str, Any]:
        """Cancel every running stream, wait for the terminals, close every connection."""
        for count, stream in enumerate(self.streams):
            if stream.message_id and stream.terminal is None:
                stream.cancelling = True
                stream.send({"type": "cancel", "message_id": stream.message_id})
            if count % 50 == 49:
                await asyncio.sleep(0.1)  # 500 cancels a second: no burst (see `ramp_per_s`)
        try:
            async with asyncio.timeout(10):
                await self.finished.wait()
        except TimeoutError:
            pass
        unterminated = sum(1 for s in self.streams
                           if s.transport is not None and s.terminal is None and s.refused is None)
        for stream in self.streams:
            stream.close()
        try:
            async with asyncio.timeout(10):
                await asyncio.gather(*(s.closed.wait() for s in self.streams if s.transport is not None))
        except TimeoutError:
            pass
        return {"tokens_total": self.tokens_total, "unterminated": unterminated,
                "ended_early": self.ended_early, "connect_failures": self.connect_failures[:5]}


async def streams(config: dict[str, Any]) -> None:
    commands = await stdin_lines()
    run = StreamRun(config)
    started = time.perf_counter()
    tasks = [asyncio.create_task(run.run_one(s)) for s in run.streams]
    try:
        try:
            async with asyncio.timeout(float(config.get("ramp_timeout_s", 120))):
                await run.all_started.wait()
        except TimeoutError:
            pass
        emit("ready", {
            "ramp_s": time.perf_counter() - started, "first_chunk": run.first_chunk,
            "refused": run.refused(), "connect_failures": len(run.connect_failures),
        })
        while True:
            command = await next_command(commands)
            if command == "mark":
                run.mark()
                emit("mark", {"tokens_total": run.tokens_total})
            elif command == "report":
                emit("report", run.report())
            else:
                emit("result", await run.stop())
                return
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
