"""Pub/sub on a Redis Cluster for the users of `store.subscriber.Subscriber` (the gateway's
live hub, the worker's cancel listener).

Redis 7 has sharded pub/sub: a channel lives in the slot of its name, SPUBLISH reaches only
that slot's master, and a subscriber must SSUBSCRIBE there. So `ClusterSubscriber` keeps one
lean connection per master (`_ShardConnection`: `smessage`s straight to the callback, as
`Subscriber` does) and sends each channel to its owner, one SSUBSCRIBE per slot (Redis
refuses one across slots). A 6.2 cluster has no sharded pub/sub: PUBLISH on any node reaches
every node over the cluster bus, but a message that crosses the bus now and then waits ~40 ms
(docs/PERFORMANCE.md, "PUBLISH across the cluster bus"). So there too each channel is subscribed
(plain SUBSCRIBE) on the master of its slot, where `store.cluster` sends its PUBLISH: delivered
on that node, not over the bus. The server's version decides at `open`.

Channels drop out when their connection ends (a master killed, a network cut) or when the
server pushes `sunsubscribe` (Redis 7, the slot moved to another master). What happens then
is the owner's choice:
- with `on_resubscribed`, the subscriber heals itself: it reads the slot map again, subscribes
  those channels where they now live (with backoff, as long as it takes), and once the server
  confirmed, calls `on_resubscribed(channels)`: the owner re-reads what was published in
  between (it is in the log, not in the channel). `closed` resolves only at `close()`.
- without it, `closed` resolves at the first loss, as `Subscriber`'s does, and the owner
  opens a new subscriber (and re-reads everything).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import hiredis
import redis.exceptions
import structlog
from redis.connection import parse_url
from redis.crc import key_slot

from store import Unavailable
from store.cluster import Address, ClusterClient, has_sharded_pubsub
from store.lean import pack
from store.retry import Backoff
from store.subscriber import OnMessage, Subscriber
from store.tasks import spawn

log = structlog.get_logger("store.cluster_subscriber")

OnResubscribed = Callable[[list[str]], None]
"""Channels subscribed again after they dropped out: re-read what they may have missed."""

_ERRORS = (redis.exceptions.RedisError, OSError, Unavailable, TimeoutError)


def _resolved(value: bool) -> asyncio.Future[bool]:
    done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
    done.set_result(value)
    return done


def _all_true(futures: Sequence[asyncio.Future[bool]]) -> asyncio.Future[bool]:
    """True once every future is True; False as soon as one is False."""
    if len(futures) == 1:
        return futures[0]
    done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
    remaining = len(futures)

    def one(future: asyncio.Future[bool]) -> None:
        nonlocal remaining
        if done.done():
            return
        if not future.result():
            done.set_result(False)
            return
        remaining -= 1
        if remaining == 0:
            done.set_result(True)

    if not futures:
        done.set_result(True)
    for future in futures:
        future.add_done_callback(one)
    return done


def _by_slot(channels: Iterable[str]) -> dict[int, list[bytes]]:
    groups: dict[int, list[bytes]] = {}
    for channel in channels:
        name = channel.encode()
        groups.setdefault(key_slot(name), []).append(name)
    return groups


class _ShardConnection(Subscriber):
    """One master's connection for sharded pub/sub (Redis 7): SSUBSCRIBE / SUNSUBSCRIBE per
    slot. A `sunsubscribe` that answers none of ours (the slot moved away) goes to
    `on_dropped`, and so does a MOVED answer to an SSUBSCRIBE (the map was stale)."""

    def __init__(self, on_message: OnMessage) -> None:
        super().__init__(on_message)
        self.on_dropped: Callable[[list[str]], None] = lambda _channels: None
        self._leaving: dict[bytes, int] = {}
        """SUNSUBSCRIBEs sent and not yet answered, per channel."""
        self._joining: dict[int, deque[list[bytes]]] = {}
        """SSUBSCRIBEs not yet answered, per slot, oldest first (a MOVED names only the slot)."""

    def subscribe(self, *channels: str) -> asyncio.Future[bool]:
        if self.closed.done():
            return _resolved(False)
        confirmations = []
        for slot, group in _by_slot(channels).items():
            done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
            self._confirmations.setdefault(group[-1], deque()).append(done)
            self._joining.setdefault(slot, deque()).append(group)
            self._write(pack((b"SSUBSCRIBE", *group)))
            confirmations.append(done)
        return _all_true(confirmations)

    def unsubscribe(self, *channels: str) -> None:
        if self.closed.done():
            return
        for group in _by_slot(channels).values():
            for channel in group:
                self._leaving[channel] = self._leaving.get(channel, 0) + 1
            self._write(pack((b"SUNSUBSCRIBE", *group)))

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while (reply := self._reader.gets()) is not False:
            if isinstance(reply, list) and len(reply) == 3:
                kind, channel = reply[0], reply[1]
                if kind == b"smessage":
                    self._on_message(channel, reply[2])
                elif kind == b"ssubscribe":
                    self._joined(channel)
                elif kind == b"sunsubscribe":
                    self._left(channel)
            elif isinstance(reply, hiredis.ReplyError):
                if str(reply).startswith("MOVED "):
                    self._moved(int(str(reply).split()[1]))
                else:
                    self._fail(reply)
                    return
            elif reply == b"OK" and self._auth_pending:
                self._auth_pending -= 1

    def _joined(self, channel: bytes) -> None:
        """One confirmation per channel; an SSUBSCRIBE is answered when its last one is."""
        slot = key_slot(channel)
        pending = self._joining.get(slot)
        if pending and pending[0][-1] == channel:
            pending.popleft()
            if not pending:
                del self._joining[slot]
            self._confirm(channel, True)

    def _left(self, channel: bytes) -> None:
        count = self._leaving.get(channel, 0)
        if count > 1:
            self._leaving[channel] = count - 1
        elif count == 1:
            del self._leaving[channel]
        else:
            self.on_dropped([channel.decode()])  # pushed by the server: the slot is no longer here

    def _moved(self, slot: int) -> None:
        """The oldest SSUBSCRIBE of `slot` was refused: this master does not serve it."""
        pending = self._joining.get(slot)
        if not pending:
            return
        group = pending.popleft()
        if not pending:
            del self._joining[slot]
        self._confirm(group[-1], False)
        self.on_dropped([channel.decode() for channel in group])


class ClusterSubscriber:
    """Subscriptions on a Redis Cluster (see the module's docstring)."""

    def __init__(
        self,
        options: dict[str, Any],
        client: ClusterClient,
        on_message: OnMessage,
        on_resubscribed: OnResubscribed | None,
        sharded: bool,
        timeout_s: float,
    ) -> None:
        self._options = options
        self._client = client
        self._on_message = on_message
        self._on_resubscribed = on_resubscribed
        self.sharded = sharded
        """Redis 7 or later: SSUBSCRIBE on each channel's master; else SUBSCRIBE there."""
        self._timeout_s = timeout_s
        self._wanted: set[str] = set()
        self._home: dict[str, Subscriber] = {}
        """Where each wanted channel is subscribed (or its SUBSCRIBE is on its way)."""
        self._homeless: set[str] = set()
        """Wanted channels that dropped out, waiting for `_heal`."""
        self._connections: dict[Address, Subscriber] = {}
        self._healing: asyncio.Task[None] | None = None
        self.closed: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()

    @classmethod
    async def open(
        cls,
        url: str,
        on_message: OnMessage,
        on_resubscribed: OnResubscribed | None = None,
        timeout_s: float = 2.0,
    ) -> ClusterSubscriber:
        """Learn the slot map and the server's version from any node (the URL's), connect to
        every master. `Unavailable` if that fails."""
        options: dict[str, Any] = parse_url(url)  # type: ignore[no-untyped-call]
        client = ClusterClient(options, timeout_s)
        try:
            await client.refresh()
            sharded = await has_sharded_pubsub(client)
        except _ERRORS as exc:
            client.disconnect()
            raise Unavailable(f"redis cluster unreachable: {exc}") from exc
        subscriber = cls(options, client, on_message, on_resubscribed, sharded, timeout_s)
        try:
            for address in client.masters():
                await subscriber._connect(address)
        except Unavailable:
            subscriber.close()
            raise
        return subscriber

    # --- commands -----------------------------------------------------------------------

    def subscribe(self, *channels: str) -> asyncio.Future[bool]:
        """Subscribe; True once the server(s) confirmed every channel; False if a connection
        ended or refused first (with `on_resubscribed`, those channels follow later)."""
        self._wanted.update(channels)
        if self.closed.done():
            return _resolved(False)
        groups: dict[Address | None, list[str]] = {}
        for channel in channels:
            groups.setdefault(self._target(channel), []).append(channel)
        confirmations: list[asyncio.Future[bool]] = []
        for address, group in groups.items():
            connection = self._connections.get(address) if address is not None else None
            if connection is None or connection.closed.done():
                self._drop_out(group)
                confirmations.append(_resolved(False))
                continue
            for channel in group:
                self._home[channel] = connection
            confirmations.append(connection.subscribe(*group))
        return _all_true(confirmations)

    def unsubscribe(self, *channels: str) -> None:
        groups: dict[int, tuple[Subscriber, list[str]]] = {}
        for channel in channels:
            self._wanted.discard(channel)
            self._homeless.discard(channel)
            home = self._home.pop(channel, None)
            if home is not None and not home.closed.done():
                groups.setdefault(id(home), (home, []))[1].append(channel)
        for home, group in groups.values():
            home.unsubscribe(*group)

    def close(self) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        if self._healing is not None:
            self._healing.cancel()
        for connection in list(self._connections.values()):
            connection.close()
        self._connections.clear()
        self._home.clear()
        self._client.disconnect()

    # --- where channels live ------------------------------------------------------------

    def _target(self, channel: str) -> Address | None:
        """Where the channel is to be subscribed (its slot's master); None while the map is
        unknown. On 6.2 a subscription left on another node after a slot moved still hears
        the channel, over the cluster bus."""
        return self._client.owner(key_slot(channel.encode()))

    async def _connect(self, address: Address) -> Subscriber:
        connection = self._connections.get(address)
        if connection is not None and not connection.closed.done():
            return connection
        kind = _ShardConnection if self.sharded else Subscriber
        host, port = address
        options = dict(self._options, host=host, port=port)
        connection = await kind.open_options(options, self._on_message, self._timeout_s)
        if isinstance(connection, _ShardConnection):
            connection.on_dropped = lambda channels, c=connection: self._dropped(c, channels)  # type: ignore[misc]
        connection.closed.add_done_callback(lambda closed, c=connection: self._lost(c, closed))  # type: ignore[misc]
        self._connections[address] = connection
        return connection

    def _lost(self, connection: Subscriber, closed: asyncio.Future[Exception | None]) -> None:
        """A node's connection ended: its channels drop out."""
        if self.closed.done():
            return
        for address, known in list(self._connections.items()):
            if known is connection:
                del self._connections[address]
        error = closed.result()
        log.warning("cluster_subscriber_lost", error=str(error))
        self._dropped(connection, [c for c, home in self._home.items() if home is connection])

    def _dropped(self, connection: Subscriber, channels: list[str]) -> None:
        """Channels that `connection` no longer carries (its node is gone, their slot moved)."""
        lost = [c for c in channels if self._home.get(c) is connection]
        for channel in lost:
            del self._home[channel]
        self._drop_out([c for c in lost if c in self._wanted])

    def _drop_out(self, channels: list[str]) -> None:
        if not channels:
            return
        if self._on_resubscribed is None:  # the owner reopens and re-reads everything
            if not self.closed.done():
                self.closed.set_result(ConnectionError(f"{len(channels)} channel(s) of a cluster node dropped out"))
            self.close()
            return
        self._homeless.update(channels)
        if self._healing is None or self._healing.done():
            self._healing = spawn(self._heal(), "cluster-resubscribe")

    async def _heal(self) -> None:
        """Until no wanted channel is homeless: read the map, subscribe them where it says
        they live, wait for the confirmations, tell the owner. Backoff between rounds, as
        long as it takes."""
        assert self._on_resubscribed is not None
        backoff = Backoff()
        while waiting := [c for c in self._homeless if c in self._wanted and c not in self._home]:
            subscribed = await self._subscribe_where_they_live(waiting)
            self._homeless.difference_update(subscribed)
            self._homeless.intersection_update(self._wanted)
            subscribed = [c for c in subscribed if c in self._wanted]  # not those unsubscribed meanwhile
            if subscribed:
                self._on_resubscribed(subscribed)
                backoff.reset()
            else:
                await backoff.wait()
        self._homeless.clear()  # all unwanted, or subscribed again by the owner meanwhile

    async def _subscribe_where_they_live(self, channels: list[str]) -> list[str]:
        """One round of `_heal`: the channels confirmed."""
        try:
            await self._client.refresh()
        except _ERRORS as exc:
            log.warning("cluster_resubscribe_retry", channels=len(channels), error=str(exc))
            return []
        groups: dict[Address | None, list[str]] = {}
        for channel in channels:
            groups.setdefault(self._target(channel), []).append(channel)
        subscribed: list[str] = []
        for address, group in groups.items():
            if address is None:
                continue
            try:
                connection = await self._connect(address)
                for channel in group:
                    self._home[channel] = connection
                async with asyncio.timeout(self._timeout_s):
                    confirmed = await connection.subscribe(*group)
            except _ERRORS as exc:
                log.warning("cluster_resubscribe_retry", channels=len(group), error=str(exc))
                confirmed = False
            if confirmed:
                subscribed.extend(group)
            else:  # not there (yet): the next round tries again
                for channel in group:
                    self._home.pop(channel, None)
        return subscribed
