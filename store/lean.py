"""A lean pipelined Redis connection for the hot paths: the worker's chunk writes and the
gateway's cancels.

redis-py's asyncio client spends several times more CPU per command than the work itself
(pool checkout, packing and parsing layers, a socket timeout per read; docs/PERFORMANCE.md).
Here a batch of commands is packed by hiredis, written at once, and its replies, parsed by
hiredis in `data_received`, resolve one future in the order the batches were sent (Redis
answers in order).

Error replies come back as values (`hiredis.ReplyError`), so one refused command does not hide
the others of its batch. A dropped connection fails every batch in flight with redis-py's
`ConnectionError` (callers already treat it as "Redis unreachable"); the next call reconnects.
A batch that times out closes the connection, since its replies would belong to nobody.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import hiredis
import redis.exceptions
from redis.connection import SSLConnection, UnixDomainSocketConnection

from store import Unavailable

Command = Sequence[bytes | str | int | float]
P = TypeVar("P", bound=asyncio.Protocol)


async def open_transport(options: dict[str, Any], factory: Callable[[], P], timeout_s: float) -> P:
    """Connect a protocol to Redis as redis-py's URL `options` say (TCP, TLS or unix socket);
    `Unavailable` if that fails within `timeout_s`."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout_s):
            if options.get("connection_class") is UnixDomainSocketConnection:
                _, protocol = await loop.create_unix_connection(factory, options["path"])
            else:
                tls = ssl.create_default_context() if options.get("connection_class") is SSLConnection else None
                _, protocol = await loop.create_connection(
                    factory, options.get("host", "localhost"), options.get("port", 6379), ssl=tls
                )
    except (OSError, TimeoutError) as exc:
        raise Unavailable(f"redis unreachable: {exc}") from exc
    return protocol


def auth_command(options: dict[str, Any]) -> tuple[str, ...] | None:
    password = options.get("password")
    if not password:
        return None
    username = options.get("username")
    return ("AUTH", username, password) if username else ("AUTH", password)


def pack(command: Command) -> bytes:
    """One command in Redis's wire format (hiredis's stub types the argument as a 1-tuple)."""
    packed: bytes = hiredis.pack_command(cast(Any, tuple(command)))
    return packed


def raised(reply: Any) -> Any:
    """`reply`, or the error it carries raised as redis-py's exception (NOSCRIPT as
    `NoScriptError`)."""
    if isinstance(reply, hiredis.ReplyError):
        text = str(reply)
        if text.startswith("NOSCRIPT"):
            raise redis.exceptions.NoScriptError(text)
        raise redis.exceptions.ResponseError(text)
    return reply


@dataclass(slots=True)
class _Batch:
    size: int
    done: asyncio.Future[list[Any]]
    replies: list[Any] = field(default_factory=list)


class Connection(asyncio.Protocol):
    """One pipelined connection: each `send` is a batch whose replies resolve its future."""

    def __init__(self) -> None:
        self._reader = hiredis.Reader()
        self._transport: asyncio.Transport | None = None
        self._batches: deque[_Batch] = deque()
        self.lost = False

    def send(self, commands: Sequence[Command]) -> asyncio.Future[list[Any]]:
        done: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        if self.lost or self._transport is None:
            done.set_exception(redis.exceptions.ConnectionError("connection to redis lost"))
            return done
        self._batches.append(_Batch(len(commands), done))
        self._transport.write(b"".join([pack(command) for command in commands]))
        return done

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        batches = self._batches
        while (reply := self._reader.gets()) is not False:
            if not batches:  # a reply nobody asked for: the stream is out of step
                self.close()
                return
            batch = batches[0]
            batch.replies.append(reply)
            if len(batch.replies) == batch.size:
                batches.popleft()
                if not batch.done.done():
                    batch.done.set_result(batch.replies)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        while self._batches:
            batch = self._batches.popleft()
            if not batch.done.done():
                batch.done.set_exception(redis.exceptions.ConnectionError(f"connection to redis lost: {exc}"))


class LeanClient:
    """One connection, opened on first use and again after it drops."""

    def __init__(self, options: dict[str, Any], timeout_s: float = 2.0) -> None:
        self._options = options
        self._timeout_s = timeout_s
        self._connection: Connection | None = None
        self._connecting: asyncio.Lock | None = None

    async def execute(self, commands: Sequence[Command]) -> list[Any]:
        """Replies in order; error replies as `hiredis.ReplyError` values. Raises redis-py's
        `ConnectionError` / `TimeoutError` if Redis cannot be reached or does not answer.

        A connection that was open but turns out closed (Redis dropped it while it was idle)
        costs one more try on a new one: every command sent here must be safe to send twice
        (reads, XACK, PUBLISH, and the scripts of `store.scripts`, which are)."""
        for last_try in (False, True):
            connection = self._connection
            fresh = connection is None or connection.lost
            if fresh:
                connection = await self._connect()
            assert connection is not None
            replies = connection.send(commands)
            try:
                async with asyncio.timeout(self._timeout_s):
                    return await replies
            except TimeoutError:
                connection.close()
                raise redis.exceptions.TimeoutError(f"redis did not answer within {self._timeout_s} s") from None
            except redis.exceptions.ConnectionError:
                if fresh or last_try:
                    raise
        raise AssertionError("unreachable")

    async def call(self, *command: bytes | str | int | float) -> Any:
        """One command; an error reply is raised (see `raised`)."""
        (reply,) = await self.execute([command])
        return raised(reply)

    async def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    async def _connect(self) -> Connection:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._connection is not None and not self._connection.lost:
                return self._connection
            self._connection = await open_connection(self._options, self._timeout_s)
            return self._connection


async def open_connection(options: dict[str, Any], timeout_s: float) -> Connection:
    """A `Connection` as redis-py's URL `options` say, authenticated and on its database;
    redis-py's `ConnectionError` / `TimeoutError` if that fails within `timeout_s`."""
    try:
        connection = await open_transport(options, Connection, timeout_s)
    except Unavailable as exc:
        raise redis.exceptions.ConnectionError(str(exc)) from exc
    setup: list[Command] = []
    auth = auth_command(options)
    if auth is not None:
        setup.append(auth)
    if options.get("db"):
        setup.append(("SELECT", options["db"]))
    if setup:
        try:
            async with asyncio.timeout(timeout_s):
                replies = await connection.send(setup)
        except TimeoutError:
            connection.close()
            raise redis.exceptions.TimeoutError("redis did not answer the connection setup") from None
        for reply in replies:
            if isinstance(reply, hiredis.ReplyError):
                connection.close()
                raise redis.exceptions.ConnectionError(f"redis refused the connection setup: {reply}")
    return connection
