"""Test support: a real WebSocket client, in-process and multi-process clusters.

Timeouts scale with TOKENRELAY_TEST_TIMEOUT_SCALE (slow CI machines)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from gateway.server import Gateway, GatewayConfig
from protocol.ids import new_message_id
from store.embedded import free_port
from store.keys import Keyspace
from store.registry import read_instances
from store.topology import Topology
from worker.engines.base import Engine
from worker.engines.synthetic import SyntheticEngine
from worker.runner import Worker, WorkerConfig

SCALE = float(os.environ.get("TOKENRELAY_TEST_TIMEOUT_SCALE", "1"))
KEYSPACE = Keyspace()
"""The keys of the deployments tests start (one shard, as gateways and workers default to)."""
JOBS_STREAM = KEYSPACE.job_streams()[0]
BACKLOG = KEYSPACE.backlogs()[0]
LLAMA_THREADS = 1
"""Threads of the llama engines that tests build themselves. ggml's threads wait for each other
after every operation, so while another process holds a core a step waits for it (docs/
PERFORMANCE.md, "One pass per step": two threads beside busy processes are slower than one);
the suite shares its machine."""


def message_id(user: str = "u") -> str:
    """A fresh id for a message of `user`, as a gateway mints it."""
    return new_message_id(KEYSPACE.tag_of_user(user))


TERMINALS = ("done", "cancelled", "error")


def is_stream_event(frame: dict[str, Any]) -> bool:
    """A chunk or terminal event of some message (an error without message_id is not)."""
    return frame["type"] in ("chunk",) + TERMINALS and "message_id" in frame


def t(seconds: float) -> float:
    return seconds * SCALE


POLL_INTERVAL_S = 0.05


async def wait_until(
    condition: Callable[[], bool | Awaitable[bool]], timeout: float = 10.0, interval: float = POLL_INTERVAL_S
) -> None:
    """Poll a condition that no event announces (a process's state, an HTTP status, a log
    file), with a deadline; TimeoutError if it never holds."""
    async with asyncio.timeout(t(timeout)):
        while True:
            result = condition()
            if not isinstance(result, bool):
                result = await result
            if result:
                return
            await asyncio.sleep(interval)


class Client:
    """A WebSocket client that reads every frame into per-message logs; `pause_reading`
    makes it a client that stops reading (the server's sends then block on TCP)."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.frames: list[dict[str, Any]] = []
        self._new = asyncio.Event()
        self._reading = asyncio.Event()
        self._reading.set()
        self._cancels_sent = 0
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        with contextlib.suppress(Exception):
            while True:
                await self._reading.wait()
                self.frames.append(json.loads(await self.ws.recv()))
                self._new.set()
        self._new.set()

    def pause_reading(self) -> None:
        self._reading.clear()

    def resume_reading(self) -> None:
        self._reading.set()

    async def send(self, **message: Any) -> None:
        await self.ws.send(json.dumps(message))

    async def wait_for(self, predicate: Any, timeout: float = 10.0, start: int = 0) -> dict[str, Any]:
        """The first frame (from index `start`) matching `predicate`."""
        index = start
        async with asyncio.timeout(t(timeout)):
            while True:
                while index < len(self.frames):
                    frame = self.frames[index]
                    index += 1
                    if predicate(frame):
                        return frame
                if self._reader.done():
                    raise ConnectionError(f"connection closed: {self.ws.close_code} {self.ws.close_reason}")
                self._new.clear()
                await self._new.wait()

    async def request(self, timeout: float = 10.0, **message: Any) -> dict[str, Any]:
        """Send and wait for the next frame that is not a chunk/terminal of a stream."""
        start = len(self.frames)
        await self.send(**message)
        return await self.wait_for(lambda f: not is_stream_event(f), timeout, start)

    async def cancel(self, timeout: float = 10.0, **fields: Any) -> dict[str, Any]:
        """Send `cancel`; its reply is the n-th `cancel_result` for the n-th cancel sent
        (a connection's requests are answered in order), so concurrent cancels pair up."""
        ordinal = self._cancels_sent
        self._cancels_sent += 1
        await self.send(type="cancel", **fields)
        async with asyncio.timeout(t(timeout)):
            while True:
                results = [f for f in self.frames if f["type"] == "cancel_result"]
                if len(results) > ordinal:
                    return results[ordinal]
                if self._reader.done():
                    raise ConnectionError(f"connection closed: {self.ws.close_code}")
                self._new.clear()
                await self._new.wait()

    async def chat(self, session_id: str, text: str = "hello", **extra: Any) -> str:
        start = len(self.frames)
        await self.send(type="chat", session_id=session_id, text=text, **extra)
        frame = await self.wait_for(lambda f: f["type"] in ("accepted", "error"), 10, start)
        assert frame["type"] == "accepted", frame
        return str(frame["message_id"])

    async def terminal(self, message_id: str, timeout: float = 20.0) -> dict[str, Any]:
        return await self.wait_for(
            lambda f: f["type"] in TERMINALS and f.get("message_id") == message_id, timeout
        )

    def events(self, message_id: str) -> list[dict[str, Any]]:
        return [f for f in self.frames if f.get("message_id") == message_id and f["type"] in ("chunk",) + TERMINALS]

    def chunks(self, message_id: str) -> list[dict[str, Any]]:
        return [f for f in self.frames if f["type"] == "chunk" and f["message_id"] == message_id]

    def text(self, message_id: str) -> str:
        return "".join(c["text"] for c in self.chunks(message_id))

    async def close(self) -> None:
        self._reading.set()
        await self.ws.close()
        await asyncio.gather(self._reader, return_exceptions=True)


@contextlib.asynccontextmanager
async def client(port: int, user: str | None = None, **kw: Any) -> AsyncIterator[Client]:
    ws = await connect(f"ws://127.0.0.1:{port}/ws", **kw)
    c = Client(ws)
    try:
        if user is not None:
            reply = await c.request(type="auth", user=user)
            assert reply == {"type": "auth_ok", "user": user}, reply
        yield c
    finally:
        await c.close()


def assert_stream_ok(c: Client, message_id: str, after_seq: int = 0) -> dict[str, Any]:
    """Contiguous seq from after_seq+1, then exactly one terminal whose seq is the last one."""
    events = c.events(message_id)
    terminals = [e for e in events if e["type"] in TERMINALS]
    assert len(terminals) == 1, events[-3:]
    assert events[-1] is terminals[0]
    seqs = [e["seq"] for e in events if e["type"] == "chunk"]
    assert seqs == list(range(after_seq + 1, after_seq + 1 + len(seqs))), seqs
    assert terminals[0]["seq"] == (seqs[-1] if seqs else after_seq) or terminals[0]["type"] == "error"
    return terminals[0]


@contextlib.asynccontextmanager
async def gateway(redis_url: str, **overrides: Any) -> AsyncIterator[Gateway]:
    gw = Gateway(GatewayConfig(redis_url=redis_url, port=0, **overrides))
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(gw.run(stop, ready))
    await asyncio.wait([task, asyncio.create_task(ready.wait())], return_when=asyncio.FIRST_COMPLETED, timeout=t(10))
    if task.done():
        task.result()
    try:
        yield gw
    finally:
        stop.set()
        await asyncio.wait_for(task, t(15))


@contextlib.asynccontextmanager
async def worker(redis_url: str, engines: Iterable[Engine] | None = None, **overrides: Any) -> AsyncIterator[Worker]:
    engine_list: list[Engine] = list(engines) if engines is not None else [SyntheticEngine(rate=200.0)] * 50
    w = Worker(WorkerConfig(redis_url=redis_url, concurrency=len(engine_list), **overrides), engine_list)
    stop = asyncio.Event()
    task = asyncio.create_task(w.run(stop))
    try:
        yield w
    finally:
        stop.set()
        await asyncio.wait_for(task, t(30))


# --- processes ---------------------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Proc:
    kind: str
    args: list[str]
    log_path: Path
    port: int | None = None
    popen: subprocess.Popen[bytes] | None = None

    def start(self, env: dict[str, str]) -> None:
        with self.log_path.open("ab") as log:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", self.kind, *self.args], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
            )

    def signal(self, sig: int) -> None:
        assert self.popen is not None
        self.popen.send_signal(sig)

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.popen is None or self.popen.poll() is not None:
            return self.popen.returncode if self.popen else None
        self.popen.send_signal(signal.SIGCONT)
        self.popen.terminate()
        try:
            return self.popen.wait(t(timeout))
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return self.popen.wait()


@dataclass
class ProcessCluster:
    """Gateways and workers as real processes, as an operator would run them."""

    redis_url: str
    tmp: Path
    procs: list[Proc] = field(default_factory=list)
    extra_env: dict[str, str] = field(default_factory=dict)
    """Set in every process's environment (e.g. TOKENRELAY_AUTH_SECRET)."""
    cluster: bool = False
    """`redis_url` names a node of a Redis Cluster (the processes get REDIS_CLUSTER=1)."""

    def env(self) -> dict[str, str]:
        env = dict(os.environ, REDIS_URL=self.redis_url, PYTHONUNBUFFERED="1", LOG_LEVEL="info",
                   REDIS_CLUSTER="1" if self.cluster else "")
        env.pop("TOKENRELAY_AUTH_SECRET", None)
        env.update(self.extra_env)
        return env

    def add_gateway(self, *extra: str) -> Proc:
        port = free_port()
        proc = Proc("gateway", ["--host", "127.0.0.1", "--port", str(port), *extra],
                    self.tmp / f"gateway-{len(self.procs)}.log", port)
        proc.start(self.env())
        self.procs.append(proc)
        return proc

    def add_worker(self, *extra: str) -> Proc:
        args = list(extra) or ["--engine", "synthetic", "--synthetic-rate", "200"]
        proc = Proc("worker", args, self.tmp / f"worker-{len(self.procs)}.log")
        proc.start(self.env())
        self.procs.append(proc)
        return proc

    @property
    def gateways(self) -> list[Proc]:
        return [p for p in self.procs if p.kind == "gateway"]

    @property
    def workers(self) -> list[Proc]:
        return [p for p in self.procs if p.kind == "worker"]

    async def wait_healthy(self, timeout: float = 20.0) -> None:
        for proc in self.gateways:
            await self._wait_serving(proc, timeout)
        r = Topology(self.redis_url, self.cluster).client()

        async def workers_registered() -> bool:
            return len(await read_instances(r, "worker")) >= len(self.workers)

        try:
            await wait_until(workers_registered, timeout)
        finally:
            await r.aclose()

    async def _wait_serving(self, proc: Proc, timeout: float) -> None:
        """Until the gateway `proc` itself answers /healthz (its instance id names its pid).
        `free_port` finds a port free at that moment only: another process on the machine (a
        second test suite) may bind it first; then the gateway exits (address in use) while
        the other answers, and it is started again on new ports (up to three times)."""
        assert proc.popen is not None
        deadline = time.monotonic() + t(timeout)
        restarts = 0
        while time.monotonic() < deadline:
            if await gateway_pid(proc.port or 0) == proc.popen.pid:
                return
            if proc.popen.poll() is not None:
                if restarts == 3 or "address already in use" not in proc.log_path.read_text().lower():
                    raise AssertionError(f"gateway exited ({proc.popen.returncode}):\n{self.logs()}")
                restarts += 1
                for flag in ("--port", "--http-port"):
                    if flag in proc.args:
                        proc.args[proc.args.index(flag) + 1] = str(free_port())
                proc.port = int(proc.args[proc.args.index("--port") + 1])
                proc.start(self.env())
            await asyncio.sleep(0.05)
        raise TimeoutError(f"gateway on port {proc.port} not serving within {timeout} s:\n{self.logs()}")

    def stop(self) -> None:
        for proc in self.procs:
            proc.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {p.log_path.name}\n{p.log_path.read_text()[-3000:]}" for p in self.procs)


async def http_get(port: int, path: str) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        data = await reader.read()
    finally:
        writer.close()
    head, _, body = data.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body


async def gateway_pid(port: int) -> int | None:
    """The pid of the gateway answering /healthz on `port` (from its instance id
    `g-<host>-<pid>-<random>`), or None when nothing healthy answers."""
    try:
        status, body = await http_get(port, "/healthz")
        instance = str(json.loads(body)["instance"])
    except (OSError, ValueError, KeyError):
        return None
    return int(instance.rsplit("-", 2)[1]) if status == 200 else None


async def http_ok(port: int, path: str) -> bool:
    try:
        status, _ = await http_get(port, path)
    except OSError:
        return False
    return status == 200


def now_ms() -> int:
    return int(time.time() * 1000)


async def raw_client_that_never_reads(port: int) -> socket.socket:
    """A client with a tiny receive buffer that completes the handshake, then never reads."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", port))
    await loop.sock_sendall(
        sock,
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    return sock


def masked_text_frame(payload: bytes) -> bytes:
    assert len(payload) < 126
    mask = b"\x01\x02\x03\x04"
    return bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def raw_websocket(port: int) -> socket.socket:
    """A client socket past the opening handshake (the server's 101 response read)."""
    sock = await raw_client_that_never_reads(port)
    loop = asyncio.get_running_loop()
    response = b""
    async with asyncio.timeout(t(10)):
        while b"\r\n\r\n" not in response:
            response += await loop.sock_recv(sock, 1)
    assert response.startswith(b"HTTP/1.1 101"), response
    return sock


def server_frames(stream: bytes) -> list[tuple[int, bytes]]:
    """(opcode, payload) of each complete server (unmasked) frame in `stream`, after the HTTP
    response if it holds one."""
    pos = stream.index(b"\r\n\r\n") + 4 if stream.startswith(b"HTTP/") else 0
    frames: list[tuple[int, bytes]] = []
    while pos + 2 <= len(stream):
        opcode, length, start = stream[pos] & 0x0F, stream[pos + 1] & 0x7F, pos + 2
        if length == 126:
            length, start = int.from_bytes(stream[start : start + 2], "big"), start + 2
        elif length == 127:
            length, start = int.from_bytes(stream[start : start + 8], "big"), start + 8
        if start + length > len(stream):
            break
        frames.append((opcode, stream[start : start + length]))
        pos = start + length
    return frames


async def read_until_eof(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    data = bytearray()
    async with asyncio.timeout(t(20)):
        while chunk := await loop.sock_recv(sock, 65536):
            data += chunk
    return bytes(data)


def close_code_in(stream: bytes) -> int | None:
    """The code of the close frame among the server's frames in `stream`."""
    for opcode, payload in server_frames(stream):
        if opcode == 0x8:
            return int.from_bytes(payload[:2], "big")
    return None
