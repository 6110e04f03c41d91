"""A lean pub/sub connection for the gateway's hot path: hiredis parses, messages go
straight to a callback from `data_received`.

redis-py's `PubSub` costs a read task, response parsing layers and a dict per message, and
every chunk and every `cancelled` a gateway relays pays it. Here a message costs one hiredis
`gets()` and one call (`python -m bench pubsub_cost` measures both; docs/PERFORMANCE.md). Commands (SUBSCRIBE, UNSUBSCRIBE, AUTH) are written without waiting;
`subscribe` returns a future that the server's confirmation resolves, so a caller can know
that it is subscribed before it reads what it must not miss.

Reconnection is the owner's job: `closed` resolves when the connection ends, and every
confirmation still pending is then resolved with False.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any, Self, cast

import hiredis
from redis.connection import parse_url

from store.lean import auth_command, open_transport, pack

OnMessage = Callable[[bytes, bytes], None]
"""(channel, data) of each published message."""


class Subscriber(asyncio.Protocol):
    def __init__(self, on_message: OnMessage) -> None:
        self._on_message = on_message
        self._reader = hiredis.Reader()
        self._transport: asyncio.Transport | None = None
        self._confirmations: dict[bytes, deque[asyncio.Future[bool]]] = {}
        self._auth_pending = 0
        self.closed: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()

    @classmethod
    async def open(cls, url: str, on_message: OnMessage, timeout_s: float = 2.0) -> Self:
        """Connect (TCP, TLS or unix socket, with AUTH from the URL); `Unavailable` if Redis
        cannot be reached within `timeout_s`."""
        options: dict[str, Any] = parse_url(url)  # type: ignore[no-untyped-call]
        return await cls.open_options(options, on_message, timeout_s)

    @classmethod
    async def open_options(cls, options: dict[str, Any], on_message: OnMessage, timeout_s: float = 2.0) -> Self:
        """`open`, with redis-py's parsed URL `options` (a cluster node's address)."""
        subscriber = await open_transport(options, lambda: cls(on_message), timeout_s)
        auth = auth_command(options)
        if auth is not None:
            subscriber._auth_pending += 1
            subscriber._write(pack(auth))
        return subscriber

    # --- commands -----------------------------------------------------------------------

    def subscribe(self, *channels: str) -> asyncio.Future[bool]:
        """Subscribe; the future is True once the server confirmed the last channel, False
        if the connection ended first."""
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        if not channels:
            done.set_result(True)
            return done
        if self.closed.done():
            done.set_result(False)
            return done
        names = [c.encode() for c in channels]
        self._confirmations.setdefault(names[-1], deque()).append(done)
        self._write(pack((b"SUBSCRIBE", *names)))
        return done

    def unsubscribe(self, *channels: str) -> None:
        if channels and not self.closed.done():
            self._write(pack(("UNSUBSCRIBE", *channels)))

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def _write(self, data: bytes) -> None:
        assert self._transport is not None
        self._transport.write(data)

    # --- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while (reply := self._reader.gets()) is not False:
            if isinstance(reply, list) and len(reply) == 3:
                kind = reply[0]
                if kind == b"message":
                    self._on_message(reply[1], reply[2])
                elif kind == b"subscribe":
                    self._confirm(reply[1], True)
            elif isinstance(reply, hiredis.ReplyError):
                self._fail(reply)
                return
            elif reply == b"OK" and self._auth_pending:
                self._auth_pending -= 1

    def connection_lost(self, exc: Exception | None) -> None:
        for waiters in self._confirmations.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(False)
        self._confirmations.clear()
        if not self.closed.done():
            self.closed.set_result(exc)

    def _confirm(self, channel: bytes, ok: bool) -> None:
        waiters = self._confirmations.get(channel)
        if not waiters:
            return
        waiter = waiters.popleft()
        if not waiters:
            del self._confirmations[channel]
        if not waiter.done():
            waiter.set_result(ok)

    def _fail(self, error: Exception) -> None:
        """An error reply (refused AUTH, a server that will not subscribe): end the connection;
        the owner sees why in `closed` and reconnects with backoff."""
        if not self.closed.done():
            self.closed.set_result(error)
        self.close()
