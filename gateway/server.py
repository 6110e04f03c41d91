"""The gateway process: WebSocket server, HTTP endpoints, the OpenAI-compatible HTTP edge,
live hub, attach leases, beat."""

from __future__ import annotations

import asyncio
import itertools
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
from gateway.connection import CLOSE_TOKEN_EXPIRED, Connection
from gateway.guards import exposure_problem
from gateway.live import LiveHub
from gateway.openai.edge import HttpEdge
from gateway.wsout import set_send_buffer
from protocol.auth import Claims, check_secret, verify_claims
from protocol.limits import LogThrottle, Quotas
from protocol.origin import origin_allowed
from protocol.validation import Limits
from store import Unavailable
from store.redis_store import Store
from store.topology import Topology, single
from store.registry import Registry, read_instances
from store.retry import REDIS_ERRORS
from store.settings import Lifetimes
from store.tasks import Supervisor, spawn

log = structlog.get_logger("gateway")


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    redis_url: str
    host: str = "127.0.0.1"
    port: int = 8000
    http_port: int | None = None
    """The OpenAI-compatible HTTP edge's port (0: any free one); None: off."""
    auth_secret: str | None = field(default=None, repr=False)
    """Signs users' tokens (at least 32 bytes). None: development mode, loopback only."""
    insecure: bool = False
    """Listen on a non-loopback address without an auth secret anyway (warned about)."""
    allow_origins: tuple[str, ...] = ()
    """Origins allowed besides the gateway's own (exact match; `*`: any)."""
    quotas: Quotas = field(default_factory=Quotas)
    auth_timeout_s: float = 10.0
    default_max_tokens: int = 256
    limits: Limits = field(default_factory=Limits)
    max_frame_bytes: int = 64 * 1024
    write_limit_bytes: int = 64 * 1024
    send_buffer_bytes: int | None = None
    """SO_SNDBUF per client socket (`--client-send-buffer`); None keeps the kernel's
    autotuning (up to tcp_wmem's maximum). A small value bounds the kernel memory a client
    that does not read can hold, and makes it hit `slow_client_timeout_s` sooner."""
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
    topology: Topology | None = None
    """Where the data lives (`store.topology.discover`); None: one Redis at `redis_url`, one shard."""

    def __post_init__(self) -> None:
        if self.auth_secret is not None:
            check_secret(self.auth_secret)
        problem = exposure_problem(self.host, self.auth_secret is not None, self.insecure)
        if problem is not None:
            raise ValueError(problem)


class Gateway:
    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.id = config.instance_id
        topology = config.topology or single(config.redis_url)
        self.store = Store.open(topology, config.lifetimes, config.cancel_ends)
        self.hub = LiveHub(topology)
        self.connections: set[Connection] = set()
        self.server: Server | None = None
        self._port: int | None = None
        self.registry = Registry(
            self.store, "gateway", self.id, self._describe, period_s=config.lifetimes.instance_ttl_s / 3
        )
        self._demo_page = resources.files("gateway").joinpath("static/index.html").read_text()
        self._refusal_log = LogThrottle()
        self._serials = itertools.count(1)
        self.http = HttpEdge(self) if config.http_port is not None else None

    def verify(self, token: str) -> Claims:
        """A token's claims, or `AuthError`."""
        assert self.config.auth_secret is not None
        return verify_claims(self.config.auth_secret, token, time.time())

    def connection_name(self) -> str:
        """A name for a new connection, unique across gateways (its per-user slot)."""
        return f"{self.id}:{next(self._serials)}"

    @property
    def port(self) -> int:
        """The bound port (fixed once listening: the sockets list empties on close)."""
        assert self._port is not None
        return self._port

    async def run(self, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
        structlog.contextvars.bind_contextvars(gateway_id=self.id)
        await self.store.start()
        if self.config.auth_secret is None:
            log.warning("auth_disabled",
                        hint="set TOKENRELAY_AUTH_SECRET or --auth-secret-file to require signed tokens")
            if self.config.insecure:
                log.warning(
                    "INSECURE_OPEN_GATEWAY",
                    host=self.config.host,
                    warning="no auth secret on a non-loopback address: anyone who can reach this port "
                    "can act as any user (--insecure)",
                )
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
            if self.http is not None:
                assert c.http_port is not None
                await self.http.start(c.host, c.http_port)
            background = Supervisor()
            background.start(self._refresh_leases, "leases")
            background.start(self.registry.run, "beat")
            background.start(self._renew_connection_slots, "connection-slots")
            background.start(self._sweep_connections, "sweep")
            log.info("gateway_listening", host=c.host, port=self.port)
            if ready is not None:
                ready.set()
            await stop.wait()
            log.info("gateway_draining", connections=len(self.connections))
            server.close(close_connections=True)
            if self.http is not None:
                await self.http.close()
            await server.wait_closed()
            await background.close()
        await self.hub.close()
        await self.registry.remove()
        await self.store.close()
        log.info("gateway_stopped")

    async def _handle(self, ws: ServerConnection) -> None:
        if self.config.send_buffer_bytes is not None:
            set_send_buffer(ws, self.config.send_buffer_bytes)
        conn = Connection(self, ws)
        self.connections.add(conn)
        metrics.CONNECTIONS.inc()
        try:
            await conn.serve()
        finally:
            self.connections.discard(conn)
            metrics.CONNECTIONS.dec()
            if conn.ping_timed_out:
                metrics.CLOSED.labels("ping_timeout").inc()
                log.info("ping_timeout", connections=len(self.connections))

    async def _http(self, ws: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        if path == "/ws":
            return self._check_origin(ws, request)
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
        if path == "/info":
            return await self._info(ws)
        if path == "/metrics":
            response = ws.respond(HTTPStatus.OK, prometheus_client.generate_latest().decode())
            response.headers["Content-Type"] = prometheus_client.CONTENT_TYPE_LATEST
            return response
        if path in ("/", "/index.html"):
            response = ws.respond(HTTPStatus.OK, self._demo_page)
            response.headers["Content-Type"] = "text/html; charset=utf-8"
            return response
        return ws.respond(HTTPStatus.NOT_FOUND, "not found\n")

    async def _info(self, ws: ServerConnection) -> Response:
        """`GET /info` (an extension, see README): the models that live workers serve, from
        their instance records; 503 when Redis cannot be asked."""
        try:
            counts = await asyncio.wait_for(self.worker_models(), timeout=1.0)
        except REDIS_ERRORS as exc:  # TimeoutError is an OSError
            log.warning("info_failed", error=str(exc))
            response = ws.respond(HTTPStatus.SERVICE_UNAVAILABLE, json.dumps({"models": [], "redis": False}) + "\n")
        else:
            models = [{"name": name, "workers": n} for name, n in sorted(counts.items())]
            response = ws.respond(HTTPStatus.OK, json.dumps({"models": models, "redis": True}) + "\n")
        response.headers["Content-Type"] = "application/json"
        response.headers["Cache-Control"] = "no-store"
        return response

    async def worker_models(self) -> dict[str, int]:
        """Model name → number of registered workers serving it (`/info`, `/v1/models`)."""
        counts: dict[str, int] = {}
        for record in await read_instances(self.store.redis, "worker"):
            if model := record.get("model"):
                counts[model] = counts.get(model, 0) + 1
        return counts

    def _check_origin(self, ws: ServerConnection, request: Request) -> Response | None:
        """None to go on with the handshake, or 403 for an origin that is not allowed."""
        headers = request.headers
        origins, hosts = headers.get_all("Origin"), headers.get_all("Host")
        if len(origins) <= 1 and len(hosts) <= 1 and origin_allowed(
            origins[0] if origins else None,
            hosts[0] if hosts else None,
            self.config.allow_origins,
            headers.get_all("X-Forwarded-Proto")[0] if "X-Forwarded-Proto" in headers else None,
        ):
            return None
        metrics.REFUSED.labels("origin").inc()
        if count := self._refusal_log.note("origin", time.monotonic()):
            log.warning("origin_refused", origin=origins[:1], host=hosts[:1], refusals=count)
        return ws.respond(HTTPStatus.FORBIDDEN, "this origin may not open a WebSocket here (see --allow-origin)\n")

    async def _sweep_connections(self) -> None:
        """One sweep for all connections instead of a timer per frame sent or per token:
        closes those whose client stopped reading (4008) or whose token expired (4001)."""
        period = min(1.0, self.config.slow_client_timeout_s / 4)
        closing: set[asyncio.Task[None]] = set()
        while True:
            await asyncio.sleep(period)
            now, wall = time.monotonic(), time.time()
            for conn in list(self.connections):
                if conn.channel.closed_slow or conn.closing:
                    continue
                if conn.channel.stalled(now):
                    task = spawn(conn.close_slow(), "close-slow")
                elif conn.expires_at is not None and wall > conn.expires_at:
                    task = spawn(conn.close(CLOSE_TOKEN_EXPIRED, "token expired", "token_expired"), "close-expired")
                else:
                    continue
                closing.add(task)
                task.add_done_callback(closing.discard)

    async def _refresh_leases(self) -> None:
        """Keep the attach lease of every watched message alive (see detach grace)."""
        lease_ms = self.config.lifetimes.detach_grace_ms
        while True:
            await asyncio.sleep(lease_ms / 3000)
            watched = [mid for conn in self.connections for mid in conn.watching()]
            if self.http is not None:
                watched += self.http.watching()
            try:
                await self.store.refresh_attach(watched, lease_ms)
            except REDIS_ERRORS as exc:
                log.warning("lease_refresh_failed", error=str(exc))

    def _describe(self) -> dict[str, str | int | float]:
        return {
            "port": self.port,
            "active": len(self.connections),
            "streams": sum(len(c.relays) for c in self.connections),
            **({"http_port": self.http.port, "http_streams": len(self.http.holds)} if self.http is not None else {}),
        }

    async def _renew_connection_slots(self) -> None:
        """Per-user connection slots lapse unless their gateway renews them: a killed gateway
        frees its users' slots. The same beat samples the connections' ping round trips."""
        lapse_ms = self.config.lifetimes.instance_ttl_s * 1000
        while True:
            slots: dict[str, list[str]] = {}
            for conn in self.connections:
                if conn.ws.latency:
                    metrics.PING_RTT.observe(conn.ws.latency)
                if conn.slot is not None:
                    slots.setdefault(conn.slot[0], []).append(conn.slot[1])
            for user, name in self.http.slots() if self.http is not None else ():
                slots.setdefault(user, []).append(name)
            try:
                await self.store.renew_connections(slots, int(time.time() * 1000), lapse_ms)
            except REDIS_ERRORS as exc:
                log.warning("connection_slots_renewal_failed", error=str(exc))
            await asyncio.sleep(self.config.lifetimes.instance_ttl_s / 3)
