"""The gateway process: WebSocket server, HTTP endpoints, live hub, attach leases, beat."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from importlib import resources

import prometheus_client
import structlog
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response

from gateway import metrics
from gateway.connection import Connection
from gateway.live import LiveHub
from protocol.auth import verify_token
from protocol.validation import Limits
from store import Unavailable
from store.redis_store import Store, connect
from store.registry import Registry
from store.retry import REDIS_ERRORS
from store.settings import Lifetimes
from store.tasks import Supervisor, spawn

log = structlog.get_logger("gateway")


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    redis_url: str
    host: str = "127.0.0.1"
    port: int = 8000
    auth_secret: str | None = None
    auth_timeout_s: float = 10.0
    default_max_tokens: int = 256
    limits: Limits = field(default_factory=Limits)
    max_frame_bytes: int = 64 * 1024
    write_limit_bytes: int = 64 * 1024
    send_buffer_bytes: int | None = None
    """SO_SNDBUF per client socket; None keeps the kernel's autotuning (up to tcp_wmem max).
    A small value makes slow clients hit `slow_client_timeout_s` sooner."""
    slow_client_timeout_s: float = 10.0
    max_pending_requests: int = 64
    ping_interval_s: float | None = 20.0
    ping_timeout_s: float | None = 20.0
    close_timeout_s: float = 5.0
    """How long a closing connection waits for the peer's close frame (a dead peer sends none)."""
    lifetimes: Lifetimes = field(default_factory=Lifetimes)
    cancel_ends: bool = True
    """A cancel ends a running message in the store at once. False: the polling baseline
    of the benchmarks (the worker that polls the cancel key ends it)."""
    instance_id: str = field(default_factory=lambda: f"g-{socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}")


class Gateway:
    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.id = config.instance_id
        self.store = Store(connect(config.redis_url, timeout_s=2.0), config.lifetimes, config.cancel_ends)
        self.hub = LiveHub(config.redis_url)
        self.connections: set[Connection] = set()
        self.server: Server | None = None
        self._port: int | None = None
        self.registry = Registry(
            self.store, "gateway", self.id, self._describe, period_s=config.lifetimes.instance_ttl_s / 3
        )
        self._demo_page = resources.files("gateway").joinpath("static/index.html").read_text()

    def verify(self, token: str) -> str:
        assert self.config.auth_secret is not None
        return verify_token(self.config.auth_secret, token, time.time())

    @property
    def port(self) -> int:
        """The bound port (fixed once listening: the sockets list empties on close)."""
        assert self._port is not None
        return self._port

    async def run(self, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
        structlog.contextvars.bind_contextvars(gateway_id=self.id)
        if self.config.auth_secret is None:
            log.warning("auth_disabled", hint="set --auth-secret to require signed tokens")
        self.hub.start()
        c = self.config
        async with serve(
            self._handle,
            c.host,
            c.port,
            process_request=self._http,
            max_size=c.max_frame_bytes,
            write_limit=c.write_limit_bytes,
            ping_interval=c.ping_interval_s,
            ping_timeout=c.ping_timeout_s,
            close_timeout=c.close_timeout_s,
            max_queue=16,
            compression=None,
        ) as server:
            self.server = server
            self._port = int(server.sockets[0].getsockname()[1])
            background = Supervisor()
            background.start(self._refresh_leases, "leases")
            background.start(self.registry.run, "beat")
            background.start(self._observe_pings, "pings")
            background.start(self._close_slow_clients, "slow-clients")
            log.info("gateway_listening", host=c.host, port=self.port)
            if ready is not None:
                ready.set()
            await stop.wait()
            log.info("gateway_draining", connections=len(self.connections))
            server.close(close_connections=True)
            await server.wait_closed()
            await background.close()
        await self.hub.close()
        await self.registry.remove()
        await self.store.close()
        log.info("gateway_stopped")

    async def _handle(self, ws: ServerConnection) -> None:
        if self.config.send_buffer_bytes is not None:
            sock = ws.transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.config.send_buffer_bytes)
        conn = Connection(self, ws)
        self.connections.add(conn)
        metrics.CONNECTIONS.inc()
        try:
            await conn.serve()
        finally:
            self.connections.discard(conn)
            metrics.CONNECTIONS.dec()
            sent = ws.protocol.close_sent
            if sent is not None and sent.code == 1011 and "keepalive" in sent.reason:
                metrics.CLOSED.labels("ping_timeout").inc()
                log.info("ping_timeout", connections=len(self.connections))

    async def _http(self, ws: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        if path == "/ws":
            return None
        if path == "/healthz":
            try:
                await asyncio.wait_for(self.store.ping(), timeout=1.0)
                ok = True
            except (Unavailable, TimeoutError):
                ok = False
            body = json.dumps({"status": "ok" if ok else "unavailable", "redis": ok, "instance": self.id,
                               "connections": len(self.connections)})
            response = ws.respond(HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE, body + "\n")
            response.headers["Content-Type"] = "application/json"
            return response
        if path == "/metrics":
            response = ws.respond(HTTPStatus.OK, prometheus_client.generate_latest().decode())
            response.headers["Content-Type"] = prometheus_client.CONTENT_TYPE_LATEST
            return response
        if path in ("/", "/index.html"):
            response = ws.respond(HTTPStatus.OK, self._demo_page)
            response.headers["Content-Type"] = "text/html; charset=utf-8"
            return response
        return ws.respond(HTTPStatus.NOT_FOUND, "not found\n")

    async def _close_slow_clients(self) -> None:
        """One sweep for all connections instead of a timer per frame sent."""
        period = min(1.0, self.config.slow_client_timeout_s / 4)
        slow: set[asyncio.Task[None]] = set()
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for conn in list(self.connections):
                if conn.channel.stalled(now) and not conn.channel.closed_slow:
                    task = spawn(conn.close_slow(), "close-slow")
                    slow.add(task)
                    task.add_done_callback(slow.discard)

    async def _refresh_leases(self) -> None:
        """Keep the attach lease of every watched message alive (see detach grace)."""
        lease_ms = self.config.lifetimes.detach_grace_ms
        while True:
            await asyncio.sleep(lease_ms / 3000)
            watched = [mid for conn in self.connections for mid in conn.watching()]
            try:
                await self.store.refresh_attach(watched, lease_ms)
            except REDIS_ERRORS as exc:
                log.warning("lease_refresh_failed", error=str(exc))

    def _describe(self) -> dict[str, str | int | float]:
        return {
            "port": self.port,
            "active": len(self.connections),
            "streams": sum(len(c.relays) for c in self.connections),
        }

    async def _observe_pings(self) -> None:
        while True:
            for conn in self.connections:
                if conn.ws.latency:
                    metrics.PING_RTT.observe(conn.ws.latency)
            await asyncio.sleep(self.config.lifetimes.instance_ttl_s / 3)
