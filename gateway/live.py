"""Live push of message frames from Redis pub/sub to the relays that watch them.

One pub/sub connection per gateway. The message log is the truth; pub/sub only makes it
fast. A relay subscribes first, then reads the log, then takes live frames, so nothing falls
between the two. When the pub/sub connection breaks, every relay re-reads its log.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable

import msgspec
import structlog

from protocol.messages import Error, encode_text
from protocol.relay import SeqTracker, Verdict
from store import keys
from store.redis_store import CONNECTION_ERRORS, Redis, Store
from store.tasks import cancel_all, spawn
from gateway import metrics

log = structlog.get_logger("gateway.live")


class Envelope(msgspec.Struct):
    """The two fields a relay needs from a frame; the frame itself is forwarded untouched."""

    type: str
    seq: int = 0


_envelope = msgspec.json.Decoder(Envelope)
TERMINAL_TYPES = frozenset({"done", "cancelled", "error"})


class LiveHub:
    def __init__(self, client: Redis, idle_resync_s: float = 2.0) -> None:
        self._client = client
        self._watchers: dict[str, set[Relay]] = {}
        self._pubsub = client.pubsub(ignore_subscribe_messages=True)
        self._tasks: list[asyncio.Task[None]] = []
        self.idle_resync_s = idle_resync_s

    def start(self) -> None:
        self._tasks = [spawn(self._listen(), "live-hub"), spawn(self._sweep_idle(), "live-idle")]

    async def close(self) -> None:
        await cancel_all(self._tasks)
        await self._pubsub.aclose()  # type: ignore[no-untyped-call]

    async def watch(self, relay: Relay) -> None:
        watchers = self._watchers.setdefault(relay.message_id, set())
        first = not watchers
        watchers.add(relay)
        if first:
            try:
                await self._pubsub.subscribe(keys.live_channel(relay.message_id))
            except CONNECTION_ERRORS as exc:
                log.warning("subscribe_failed", error=str(exc))

    async def unwatch(self, relay: Relay) -> None:
        watchers = self._watchers.get(relay.message_id)
        if watchers is None:
            return
        watchers.discard(relay)
        if not watchers:
            del self._watchers[relay.message_id]
            try:
                await self._pubsub.unsubscribe(keys.live_channel(relay.message_id))
            except CONNECTION_ERRORS as exc:
                log.warning("unsubscribe_failed", error=str(exc))

    def watched(self) -> list[str]:
        return list(self._watchers)

    async def _sweep_idle(self) -> None:
        """A relay that heard nothing for a while re-reads its log: a lost push (pub/sub is
        at-most-once) must not hang a stream. One sweep instead of a timer per wait."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.idle_resync_s / 2)
            quiet_since = loop.time() - self.idle_resync_s
            for watchers in list(self._watchers.values()):
                for relay in watchers:
                    if relay.last_heard < quiet_since:
                        relay.resync()

    async def _listen(self) -> None:
        backoff = 0.05
        while True:
            try:
                if not self._pubsub.subscribed:
                    await self._resubscribe()
                message = await self._pubsub.get_message(timeout=None)
                backoff = 0.05
            except CONNECTION_ERRORS as exc:
                log.warning("live_hub_retry", error=str(exc), backoff_s=backoff)
                await self._reset()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            if message is None or message["type"] != "message":
                continue
            channel = message["channel"].decode()
            frame = message["data"].decode()
            for relay in list(self._watchers.get(channel[len(keys.LIVE_PREFIX) :], ())):
                relay.push(frame)

    async def _reset(self) -> None:
        """A fresh pub/sub connection; `_resubscribe` then has every relay re-read its log."""
        await self._pubsub.aclose()  # type: ignore[no-untyped-call]
        self._pubsub = self._client.pubsub(ignore_subscribe_messages=True)

    async def _resubscribe(self) -> None:
        """Subscribe to every watched message, then have each relay re-read its log: frames
        published while the connection was down are in the log, not in the channel."""
        channels = [keys.live_channel(mid) for mid in self._watchers]
        if not channels:
            await self._pubsub.subscribe(keys.live_channel("-"))
            return
        for start in range(0, len(channels), 500):
            await self._pubsub.subscribe(*channels[start : start + 500])
        for watchers in self._watchers.values():
            for relay in watchers:
                relay.resync()


Send = Callable[[str], Awaitable[None]]


class Relay:
    """Delivers one message's frames to one connection: replay from the log, then live."""

    def __init__(
        self,
        hub: LiveHub,
        store: Store,
        message_id: str,
        after_seq: int,
        send: Send,
        max_inbox: int = 256,
    ) -> None:
        self.hub = hub
        self.store = store
        self.message_id = message_id
        self.tracker = SeqTracker(last_seq=after_seq)
        self._send = send
        self._inbox: deque[str] = deque()
        self._max_inbox = max_inbox
        self._wake = asyncio.Event()
        self._resync = True
        self.last_heard = asyncio.get_running_loop().time()

    def push(self, frame: str) -> None:
        """Called by the hub. A full inbox means the client is behind: drop and re-read the
        log later, so a slow client costs a bounded amount of gateway memory."""
        if len(self._inbox) >= self._max_inbox:
            self._inbox.clear()
            self._resync = True
        else:
            self._inbox.append(frame)
        self.last_heard = asyncio.get_running_loop().time()
        self._wake.set()

    def resync(self) -> None:
        self._resync = True
        self.last_heard = asyncio.get_running_loop().time()
        self._wake.set()

    @property
    def finished(self) -> bool:
        return self.tracker.finished

    async def run(self) -> None:
        await self.hub.watch(self)
        metrics.STREAMS.inc()
        try:
            while not self.tracker.finished:
                if self._resync:
                    self._resync = False
                    self._inbox.clear()
                    metrics.RESYNCS.inc()
                    await self._replay()
                    continue
                if not self._inbox:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                await self._offer(self._inbox.popleft())
        finally:
            metrics.STREAMS.dec()
            await self.hub.unwatch(self)

    async def _replay(self) -> None:
        frames = await self.store.read_log(self.message_id, self.tracker.last_seq)
        for frame in frames:
            await self._offer(frame)
            if self._resync:
                await self._end("the message's earlier chunks are no longer kept")
                return
        if not frames and await self.store.message_owner(self.message_id) is None:
            await self._end("the message no longer exists")

    async def _end(self, why: str) -> None:
        """The stream cannot continue (log trimmed or expired): say so, terminally."""
        frame = encode_text(
            Error(code="not_found", message=why, message_id=self.message_id, seq=self.tracker.last_seq)
        )
        self.tracker.finished = True
        await self._send(frame)

    async def _offer(self, frame: str) -> None:
        envelope = _envelope.decode(frame)
        verdict = self.tracker.offer(envelope.seq, envelope.type in TERMINAL_TYPES)
        if verdict is Verdict.DELIVER:
            await self._send(frame)
        elif verdict is Verdict.GAP:
            self._resync = True
