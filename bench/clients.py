"""Client processes of the benchmarks: `python -m bench.clients MODE CONFIG_JSON`.

Clients never share a process with a server: the benchmark (`bench.cluster.Cluster.client`)
starts this module as a subprocess, reads `TAG {json}` lines from its stdout and sends it
commands as lines on stdin. Every mode runs on uvloop with the `websockets` asyncio client,
with RLIMIT_NOFILE raised to the hard limit.

Modes (CONFIG keys in brackets):
- `relay` [port]: one connection; each `send {"prompt": ..., "max_tokens": N}` command runs one
  chat in a fresh session and prints `message` with the send / accepted / first-chunk / terminal
  times and the text; `stop` closes it.
- `cancels` [ports, cancels, lanes, wait_chunks, max_tokens, deadline_s]: each lane is one user with
  connection A on one gateway and B on another. A starts a chat; after `wait_chunks` chunks, B
  sends `cancel`; the latency is from sending the cancel on B to `cancelled` arriving on A.
  No new cancel starts after `deadline_s`. Prints `ready`, waits for `go`, prints `result`,
  waits for `stop`.
- `streams` [ports, streams, max_tokens, ramp_per_s]: one connection per stream, spread over the
  ports, each streaming one long message; at most `ramp_per_s` new streams a second (0: all at
  once). Prints `ready` once every stream has its first chunk;
  `mark` starts a measuring window (prints `mark`), `report` ends it (inter-chunk gaps, tokens);
  `stop` cancels every stream, closes and prints `result`.
- `idle` [port, connections, heartbeat_s]: connections that only send a heartbeat every
  `heartbeat_s`. Prints `ready` once all are open; `report` gives the heartbeats sent and
  answered since then; `stop` closes them all.

Common keys: `connect_concurrency` (handshakes in flight, default 100), `compression`
("deflate", what browsers offer, or null).
"""

from __future__ import annotations

import asyncio
import json
import random
import resource
import sys
import time
from array import array
from collections.abc import Callable
from typing import Any

import msgspec
import uvloop
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from bench.stats import percentiles

TERMINALS = frozenset({"done", "cancelled", "error"})


class Frame(msgspec.Struct):
    """The fields of a server frame the clients look at (the rest is ignored)."""

    type: str
    message_id: str | None = None
    seq: int = 0
    text: str = ""
    status: str | None = None
    code: str | None = None
    finish_reason: str | None = None
    ts: float | None = None


_decode = msgspec.json.Decoder(Frame).decode


def emit(tag: str, payload: dict[str, Any] | None = None) -> None:
    sys.stdout.write(f"{tag} {json.dumps(payload or {})}\n")
    sys.stdout.flush()


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


async def stdin_lines() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def next_command(reader: asyncio.StreamReader) -> str:
    line = await reader.readline()
    return line.decode().strip() or "stop"  # end of stdin: the benchmark went away


async def open_ws(port: int, user: str, config: dict[str, Any]) -> ClientConnection:
    """Connect and authenticate (development mode: the user is named, no token)."""
    ws = await connect(
        f"ws://127.0.0.1:{port}/ws",
        open_timeout=60,
        ping_interval=None,  # like a browser: the gateway pings, the client answers
        max_size=1 << 20,
        compression=config.get("compression", "deflate"),
    )
    await ws.send(json.dumps({"type": "auth", "user": user}))
    async with asyncio.timeout(30):
        reply = _decode(await ws.recv())
    if reply.type != "auth_ok":
        raise ConnectionError(f"auth refused: {reply}")
    return ws


def tokens_in(text: str) -> int:
    """Synthetic tokens are words that end with a space."""
    return text.count(" ")


# --- relay ------------------------------------------------------------------------------


async def relay(config: dict[str, Any]) -> None:
    commands = await stdin_lines()
    ws = await open_ws(int(config["port"]), "relay", config)
    emit("ready")
    try:
        index = 0
        while True:
            command, _, payload = (await next_command(commands)).partition(" ")
            if command != "send":
                break
            request = json.loads(payload)
            index += 1
            emit("message", await relay_one(ws, f"relay-{time.time_ns()}-{index}", str(request["prompt"]),
                                            int(request["max_tokens"])))
    finally:
        await ws.close()
    emit("result")


async def relay_one(ws: ClientConnection, session: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    """One chat in a fresh session; times are seconds since the chat was sent."""
    sent = time.perf_counter()
    await ws.send(json.dumps({"type": "chat", "session_id": session, "text": prompt, "max_tokens": max_tokens}))
    record: dict[str, Any] = {"prompt": prompt, "chunks": 0, "first_s": None}
    parts: list[str] = []
    async with asyncio.timeout(120):
        async for raw in ws:
            now = time.perf_counter()
            frame = _decode(raw)
            if frame.type == "accepted":
                record["accepted_s"] = now - sent
            elif frame.type == "chunk":
                if record["first_s"] is None:
                    record["first_s"] = now - sent
                record["chunks"] += 1
                parts.append(frame.text)
            elif frame.type in TERMINALS:
                record.update(end_s=now - sent, terminal=frame.type, finish_reason=frame.finish_reason,
                              code=frame.code)
                break
    record["text"] = "".join(parts)
    return record


# --- cancels ----------------------------------------------------------------------------


class Conn:
    """A connection whose frames, stamped on arrival, wait in a queue."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.queue: asyncio.Queue[tuple[float, Frame]] = asyncio.Queue()
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                self.queue.put_nowait((time.perf_counter(), _decode(raw)))
        except ConnectionClosed:
            pass

    async def next(self, want: Callable[[Frame], bool], timeout_s: float) -> tuple[float, Frame]:
        async with asyncio.timeout(timeout_s):
            while True:
                stamp, frame = await self.queue.get()
                if want(frame):
                    return stamp, frame

    async def send(self, message: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(message))

    async def close(self) -> None:
        await self.ws.close()
        await asyncio.gather(self.reader, return_exceptions=True)


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
        await a.send({"type": "chat", "session_id": session, "text": "count to a million",
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
        await b.send({"type": "cancel", "message_id": mid})
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
        a = Conn(await open_ws(ports[lane % len(ports)], user, config))
        b = Conn(await open_ws(ports[(lane + 1) % len(ports)], user, config))
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
        await asyncio.gather(*(c.close() for pair in pairs for c in pair), return_exceptions=True)


# --- streams ----------------------------------------------------------------------------


class Stream:
    __slots__ = ("index", "ws", "message_id", "last", "terminal", "refused", "cancelling")

    def __init__(self, index: int) -> None:
        self.index = index
        self.ws: ClientConnection | None = None
        self.message_id: str | None = None
        self.last: float | None = None
        self.terminal: str | None = None
        self.refused: str | None = None
        self.cancelling = False


class StreamRun:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.ports: list[int] = [int(p) for p in config["ports"]]
        self.max_tokens = int(config.get("max_tokens", 2000))
        self.ramp_per_s = float(config.get("ramp_per_s", 0))
        self.streams = [Stream(i) for i in range(int(config["streams"]))]
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

    def _settled(self) -> None:
        """A stream got its first chunk, or will never get one."""
        self.settled += 1
        if self.settled >= len(self.streams):
            self.all_started.set()

    def _over(self) -> None:
        """A stream ended (terminal event, refusal or no connection)."""
        self.over += 1
        if self.over >= len(self.streams):
            self.finished.set()

    def _refused(self) -> int:
        return sum(1 for s in self.streams if s.refused is not None)

    async def run_one(self, stream: Stream) -> None:
        loop = asyncio.get_running_loop()
        if self.ramp_per_s > 0:
            await asyncio.sleep(stream.index / self.ramp_per_s)
        try:
            async with self._gate:
                ws = await open_ws(self.ports[stream.index % len(self.ports)], f"load{stream.index % 500}", self.config)
        except (OSError, TimeoutError, ConnectionError, ConnectionClosed) as exc:
            self.connect_failures.append(repr(exc)[:200])
            self._settled()
            self._over()
            return
        stream.ws = ws
        await ws.send(json.dumps({
            "type": "chat", "session_id": f"load-{stream.index}-{time.time_ns()}",
            "text": "tell me a very long story", "max_tokens": self.max_tokens,
        }))
        try:
            async for raw in ws:
                now = loop.time()
                frame = _decode(raw)
                kind = frame.type
                if kind == "chunk":
                    count = tokens_in(frame.text)
                    self.tokens_total += count
                    if self.recording:
                        self.tokens += count
                        if stream.last is not None:
                            self.gaps.append(now - stream.last)
                    if stream.last is None:
                        self.first_chunk += 1
                        self._settled()
                    stream.last = now
                elif kind == "accepted":
                    stream.message_id = frame.message_id
                elif kind in TERMINALS and frame.message_id is not None:
                    stream.terminal = kind
                    if not stream.cancelling:
                        self.ended_early += 1
                    if stream.last is None:
                        self._settled()
                    self._over()
                elif kind == "error":  # refused (overloaded, rate limited, ...)
                    stream.refused = frame.code or "error"
                    self._settled()
                    self._over()
        except ConnectionClosed:
            pass

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
            "refused": self._refused(),
            "connect_failures": len(self.connect_failures),
        }

    async def stop(self) -> dict[str, Any]:
        """Cancel every running stream, wait for the terminals, close every connection."""
        for count, stream in enumerate(self.streams):
            if stream.ws is not None and stream.message_id and stream.terminal is None:
                stream.cancelling = True
                try:
                    await stream.ws.send(json.dumps({"type": "cancel", "message_id": stream.message_id}))
                except ConnectionClosed:
                    pass
            if count % 50 == 49:
                await asyncio.sleep(0.1)  # 500 cancels a second: no burst (see `ramp_per_s`)
        try:
            async with asyncio.timeout(10):
                await self.finished.wait()
        except TimeoutError:
            pass
        unterminated = sum(1 for s in self.streams if s.ws is not None and s.terminal is None and s.refused is None)
        await close_all([s.ws for s in self.streams if s.ws is not None])
        return {"tokens_total": self.tokens_total, "unterminated": unterminated,
                "ended_early": self.ended_early, "connect_failures": self.connect_failures[:5]}


async def close_all(sockets: list[ClientConnection]) -> None:
    gate = asyncio.Semaphore(500)

    async def close(ws: ClientConnection) -> None:
        async with gate:
            try:
                async with asyncio.timeout(10):
                    await ws.close()
            except (TimeoutError, OSError):
                ws.transport.abort()

    await asyncio.gather(*(close(ws) for ws in sockets), return_exceptions=True)


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
            "refused": run._refused(), "connect_failures": len(run.connect_failures),
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


# --- idle -------------------------------------------------------------------------------


class IdleRun:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.port = int(config["port"])
        self.heartbeat_s = float(config.get("heartbeat_s", 10.0))
        self.sockets: list[ClientConnection] = []
        self.failures: list[str] = []
        self.sent = 0
        self.acks = 0
        self.rtts: list[float] = []
        self.since = 0.0
        """Heartbeats sent before this (wall clock) are not counted: `ready` resets it."""
        self._gate = asyncio.Semaphore(int(config.get("connect_concurrency", 100)))

    def reset(self) -> None:
        self.since = time.time()
        self.sent = self.acks = 0
        self.rtts = []

    async def run_one(self, index: int) -> None:
        try:
            async with self._gate:
                ws = await open_ws(self.port, f"idle{index % 1000}", self.config)
        except (OSError, TimeoutError, ConnectionError, ConnectionClosed) as exc:
            self.failures.append(repr(exc)[:200])
            return
        self.sockets.append(ws)
        beat = asyncio.create_task(self._beat(ws))
        try:
            async for raw in ws:
                frame = _decode(raw)
                if frame.type == "heartbeat_ack" and frame.ts is not None and frame.ts >= self.since:
                    self.acks += 1
                    self.rtts.append(time.time() - frame.ts)
        except ConnectionClosed:
            pass
        finally:
            beat.cancel()

    async def _beat(self, ws: ClientConnection) -> None:
        await asyncio.sleep(random.uniform(0, self.heartbeat_s))
        while True:
            try:
                await ws.send(json.dumps({"type": "heartbeat", "ts": time.time()}))
            except ConnectionClosed:
                return
            self.sent += 1
            await asyncio.sleep(self.heartbeat_s)


async def idle(config: dict[str, Any]) -> None:
    commands = await stdin_lines()
    run = IdleRun(config)
    started = time.perf_counter()
    count = int(config["connections"])
    tasks = [asyncio.create_task(run.run_one(i)) for i in range(count)]
    try:
        async with asyncio.timeout(float(config.get("ramp_timeout_s", 120))):
            while len(run.sockets) + len(run.failures) < count:
                await asyncio.sleep(0.05)
    except TimeoutError:
        pass
    extensions = sorted({str(ws.response.headers.get("Sec-WebSocket-Extensions", ""))
                         for ws in run.sockets if ws.response is not None})
    emit("ready", {"connected": len(run.sockets), "failures": len(run.failures),
                   "first_failures": run.failures[:3], "ramp_s": time.perf_counter() - started,
                   "extensions": ", ".join(e for e in extensions if e)})
    run.reset()  # heartbeats are counted once every connection is open
    try:
        while True:
            command = await next_command(commands)
            if command == "report":
                open_now = sum(1 for ws in run.sockets if ws.close_code is None)
                emit("report", {"open": open_now, "heartbeats_sent": run.sent, "acks": run.acks,
                                "heartbeat_rtt": percentiles(run.rtts)})
            else:
                await close_all(run.sockets)
                emit("result", {"acks": run.acks})
                return
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


MODES = {"relay": relay, "cancels": cancels, "streams": streams, "idle": idle}


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] not in MODES:
        sys.exit(f"usage: python -m bench.clients {{{'|'.join(MODES)}}} CONFIG_JSON")
    raise_nofile()
    uvloop.run(MODES[args[0]](json.loads(args[1])))


if __name__ == "__main__":
    main()
