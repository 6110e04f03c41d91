"""Client processes of the benchmarks: `python -m bench.clients MODE CONFIG_JSON`.

Clients never share a process with a server: the benchmark (`bench.cluster.Cluster.client`)
starts this module as a subprocess, reads `TAG {json}` lines from its stdout and sends it
commands as lines on stdin. Every mode runs on uvloop with RLIMIT_NOFILE raised to the hard
limit. `relay` and `idle` use the `websockets` asyncio client; `cancels` (`bench.cancels`) and
`streams` (`bench.streams`) use `picows`, whose frames are parsed in C and handled in the
transport's callback: the load generator shares the machine with the system it measures,
and the cancel timings should hold as little of the client as possible.

Modes (CONFIG keys in brackets):
- `relay` [port]: one connection; each `send {"prompt": ..., "max_tokens": N[, "temperature": T]}` command runs one
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

- `openai_edge` [ws_port, http_port]: the same chats through both edges, and Stops by
  disconnect (`bench.openai_client`).

Common keys: `connect_concurrency` (handshakes in flight, default 100); for `relay` and `idle`,
`compression` ("deflate", what browsers offer, or null).
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from typing import Any

import uvloop
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from bench.clientio import (
    TERMINALS, decode_frame, emit, next_command, raise_nofile, stdin_lines,
)
from bench.stats import percentiles
from bench.cancels import cancels
from bench.openai_client import openai_edge
from bench.streams import streams


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
        reply = decode_frame(await ws.recv())
    if reply.type != "auth_ok":
        raise ConnectionError(f"auth refused: {reply}")
    return ws


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
                                            int(request["max_tokens"]), request.get("temperature")))
    finally:
        await ws.close()
    emit("result")


async def relay_one(
    ws: ClientConnection, session: str, prompt: str, max_tokens: int, temperature: float | None = None
) -> dict[str, Any]:
    """One chat in a fresh session; times are seconds since the chat was sent."""
    chat: dict[str, Any] = {"type": "chat", "session_id": session, "text": prompt, "max_tokens": max_tokens}
    if temperature is not None:
        chat["temperature"] = temperature
    sent = time.perf_counter()
    await ws.send(json.dumps(chat))
    record: dict[str, Any] = {"prompt": prompt, "chunks": 0, "first_s": None}
    parts: list[str] = []
    async with asyncio.timeout(120):
        async for raw in ws:
            now = time.perf_counter()
            frame = decode_frame(raw)
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
                frame = decode_frame(raw)
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


MODES = {"relay": relay, "cancels": cancels, "streams": streams, "idle": idle, "openai_edge": openai_edge}


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] not in MODES:
        sys.exit(f"usage: python -m bench.clients {{{'|'.join(MODES)}}} CONFIG_JSON")
    raise_nofile()
    uvloop.run(MODES[args[0]](json.loads(args[1])))


if __name__ == "__main__":
    main()
