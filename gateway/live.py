"""Live push of message frames from Redis pub/sub to the relays that watch them.

One pub/sub connection per gateway (`store.subscriber`: frames go from hiredis straight to
the relays). The message log is the truth; pub/sub only makes it fast. A relay subscribes
(and waits for the server's confirmation), then reads the log, then takes live frames, so
nothing falls between the two. When the pub/sub connection breaks, every relay re-reads its
log.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Protocol

import msgspec
import structlog
from redis.exceptions import ResponseError

from protocol.messages import Error, encode_text
from protocol.relay import SeqTracker, Verdict
from store import Unavailable, keys
from store.redis_store import LOG_PAGE, Store
from store.cluster_subscriber import ClusterSubscriber
from store.subscriber import Subscriber
from store.topology import Topology
from store.retry import Backoff
from store.tasks import Supervisor
from gateway import metrics

log = structlog.get_logger("gateway.live")


class Envelope(msgspec.Struct):
    """The two fields a relay needs from a frame; the frame itself is forwarded untouched."""

    type: str
    seq: int = 0


_envelope = msgspec.json.Decoder(Envelope)
RESTART_S = 0.5
"""Pause before a failed relay runs again (it re-reads the log from where it was)."""
TERMINAL_TYPES = frozenset({"done", "cancelled", "error"})
_RESYNCS = {
    cause: metrics.RESYNCS.labels(cause) for cause in ("start", "gap", "overflow", "idle", "reconnect")
}


class LiveHub:
    def __init__(
        self,
        topology: Topology,
        idle_resync_s: float = 2.0,
        confirm_timeout_s: float = 2.0,
        replay_page: int = LOG_PAGE,
    ) -> None:
        self._topology = topology
        self.replay_page = replay_page
        """Log entries a relay reads at once when it replays."""
        self.confirm_timeout_s = confirm_timeout_s
        self._watchers: dict[str, set[Relay]] = {}
        self._subscriber: Subscriber | ClusterSubscriber | None = None
        self._tasks = Supervisor()
        self.idle_resync_s = idle_resync_s

    def start(self) -> None:
        self._tasks.start(self._maintain, "live-hub")
        self._tasks.start(self._sweep_idle, "live-idle")

    async def close(self) -> None:
        await self._tasks.close()
        if self._subscriber is not None:
            self._subscriber.close()

    async def watch(self, relay: Relay) -> None:
        """Returns once the server confirmed the subscription, so the log read that follows
        misses nothing; or once the connection is down (reconnecting subscribes and has every
        relay re-read its log); or after `confirm_timeout_s` (a stalled Redis: the relay's
        log read then fails as unavailable and is retried)."""
        watchers = self._watchers.setdefault(relay.message_id, set())
        first = not watchers
        watchers.add(relay)
        if first and self._subscriber is not None:
            confirmed = self._subscriber.subscribe(keys.live_channel(relay.message_id))
            await asyncio.wait([confirmed], timeout=self.confirm_timeout_s)

    async def unwatch(self, relay: Relay) -> None:
        watchers = self._watchers.get(relay.message_id)
        if watchers is None:
            return
        watchers.discard(relay)
        if not watchers:
            del self._watchers[relay.message_id]
            if self._subscriber is not None:
                self._subscriber.unsubscribe(keys.live_channel(relay.message_id))

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
                        relay.resync("idle")

    def _on_message(self, channel: bytes, data: bytes) -> None:
        watchers = self._watchers.get(keys.message_of_live_channel(channel))
        if not watchers:
            return
        for relay in list(watchers):
            relay.push(data)

    def _on_resubscribed(self, channels: list[str]) -> None:
        """A cluster node was lost or a slot moved: these channels are subscribed again, and
        what was published meanwhile is in the logs."""
        for channel in channels:
            for relay in list(self._watchers.get(keys.message_of_live_channel(channel.encode()), ())):
                relay.resync("reconnect")

    async def _maintain(self) -> None:
        """Keep one subscriber connected. After each (re)connect: subscribe every watched
        message, then have each relay re-read its log (frames published while the connection
        was down are in the log, not in the channel)."""
        backoff = Backoff()
        while True:
            try:
                subscriber = await self._topology.subscriber(self._on_message, self._on_resubscribed)
            except Unavailable as exc:
                delay = await backoff.wait()
                log.warning("live_hub_retry", error=str(exc), backoff_s=round(delay, 3))
                continue
            self._subscriber = subscriber
            try:
                channels = [keys.live_channel(mid) for mid in self._watchers]
                confirmed = await asyncio.gather(
                    *(subscriber.subscribe(*channels[i : i + 500]) for i in range(0, len(channels), 500))
                )
                if all(confirmed):
                    backoff.reset()
                    for watchers in list(self._watchers.values()):
                        for relay in watchers:
                            relay.resync("reconnect")
                error = await subscriber.closed
            finally:
                subscriber.close()
                self._subscriber = None
            delay = await backoff.wait()
            log.warning("live_hub_retry", error=str(error), backoff_s=round(delay, 3))


class Outlet(Protocol):
    """Where a relay's frames go (the connection's `SendChannel`)."""

    async def send(self, frame: str | bytes) -> None: ...


TerminalGate = Callable[[str], "asyncio.Event | None"]
"""Given the message id: an event that a terminal frame must wait for, or None."""

SendNow = Callable[[bytes], bool]
"""Writes a frame without waiting if the outlet can (True); False writes nothing."""


class Relay:
    """Delivers one message's frames to one connection: replay from the log, then live.

    The log is the truth. Whatever leaves a relay unsure that it holds every frame (it just
    attached, a push skipped a seq, its inbox overflowed behind a slow client, it heard
    nothing for a while, the pub/sub connection came back) only asks for a re-read from the
    relay's position; a replay under way goes on to the log's end and another follows it.
    Only the log can end a stream early: an entry missing right after the relay's position
    (trimmed), or a message that no longer exists.
    """

    def __init__(
        self,
        hub: LiveHub,
        store: Store,
        message_id: str,
        after_seq: int,
        outlet: Outlet,
        terminal_gate: TerminalGate | None = None,
        send_now: SendNow | None = None,
        max_inbox: int = 256,
    ) -> None:
        self.hub = hub
        self.store = store
        self.message_id = message_id
        self.tracker = SeqTracker(last_seq=after_seq)
        self._outlet = outlet
        self._terminal_gate = terminal_gate
        self._send_now = send_now
        self._waiting = False
        """True while `run` waits for a push with nothing queued: the next frame may skip it."""
        self._inbox: deque[bytes] = deque()
        self._max_inbox = max_inbox
        self._wake = asyncio.Event()
        self._resync = True
        _RESYNCS["start"].inc()
        self.last_heard = asyncio.get_running_loop().time()

    def push(self, frame: bytes) -> None:
        """Called by the hub: the frame waits in the inbox for `run`. A full inbox means the
        client is behind: drop and re-read the log later, so a slow client costs a bounded
        amount of gateway memory."""
        self.last_heard = asyncio.get_running_loop().time()
        if self._waiting and self._deliver_at_once(frame):
            return
        if len(self._inbox) >= self._max_inbox:
            self._inbox.clear()
            self._ask_resync("overflow")
        else:
            self._inbox.append(frame)
        self._wake.set()

    def _deliver_at_once(self, frame: bytes) -> bool:
        """The next chunk of a stream whose relay is idle goes straight out when the outlet
        has room: no task switch per frame. Terminals (which may wait for a cancel's answer),
        gaps, duplicates and a busy outlet take the inbox and `run`."""
        if self._send_now is None or self._inbox or self._resync:
            return False
        envelope = _envelope.decode(frame)
        if envelope.type in TERMINAL_TYPES or self.tracker.peek(envelope.seq, False) is not Verdict.DELIVER:
            return False
        if not self._send_now(frame):
            return False
        self.tracker.offer(envelope.seq, False)
        return True

    def _gate(self) -> asyncio.Event | None:
        """What this message's terminal frame must wait for, if anything."""
        return self._terminal_gate(self.message_id) if self._terminal_gate is not None else None

    def resync(self, cause: str) -> None:
        """Re-read the log (`cause`: idle or reconnect, counted in the resyncs metric)."""
        self._ask_resync(cause)
        self.last_heard = asyncio.get_running_loop().time()
        self._wake.set()

    def _ask_resync(self, cause: str) -> None:
        self._resync = True
        _RESYNCS[cause].inc()

    @property
    def finished(self) -> bool:
        return self.tracker.finished

    async def run_until_end(self, outlet_errors: tuple[type[BaseException], ...]) -> None:
        """`run` until the message's terminal is delivered: a run that fails (Redis
        unavailable, or anything else) starts again after `RESTART_S` from the last seq it
        delivered, so a stream never stalls on an error. `outlet_errors` (the client is
        gone) end it at once, raised."""
        while True:
            try:
                await self.run()
                return
            except outlet_errors:
                raise
            except Exception as exc:
                if isinstance(exc, Unavailable):
                    log.warning("relay_unavailable", message_id=self.message_id, error=str(exc))
                else:
                    log.exception("relay_failed", message_id=self.message_id)
            await asyncio.sleep(RESTART_S)
            self._ask_resync("start")

    async def run(self) -> None:
        metrics.STREAMS.inc()
        try:
            await self.hub.watch(self)  # in the try: a relay cancelled while it subscribes leaves the hub too
            while not self.tracker.finished:
                if self._resync:
                    self._resync = False
                    self._inbox.clear()
                    await self._replay()
                    continue
                if not self._inbox:
                    self._wake.clear()
                    self._waiting = True
                    try:
                        await self._wake.wait()
                    finally:
                        self._waiting = False
                    continue
                if await self._offer(self._inbox.popleft()) is Verdict.GAP:
                    self._ask_resync("gap")
        finally:
            metrics.STREAMS.dec()
            await self.hub.unwatch(self)

    async def _replay(self) -> None:
        """Deliver the log from the relay's position to its end, a page at a time (frames
        pushed meanwhile wait in the inbox, or ask for another replay)."""
        page_size = self.hub.replay_page
        first = True
        while not self.tracker.finished:
            try:
                page = await self.store.read_log_page(self.message_id, self.tracker.last_seq, page_size)
                gone = not page and first and await self.store.message_owner(self.message_id) is None
            except ResponseError as exc:  # LOADING while an AOF loads, BUSY behind a slow script
                raise Unavailable(f"redis refused a log read: {exc}") from exc
            if gone:
                await self._end("the message no longer exists")
            if not page:
                return
            for position, frame in page:
                if position != self.tracker.last_seq + 1 or await self._offer(frame) is Verdict.GAP:
                    await self._end("the message's earlier chunks are no longer kept")
                    return
                if self.tracker.finished:
                    return
            if len(page) < page_size:
                return
            first = False

    async def _end(self, why: str) -> None:
        """The stream cannot continue (log trimmed or expired): say so, terminally, with
        `not_found` at the last seq delivered."""
        frame = encode_text(
            Error(code="not_found", message=why, message_id=self.message_id, seq=self.tracker.last_seq)
        )
        self.tracker.finished = True
        await self._outlet.send(frame)

    async def _offer(self, frame: bytes) -> Verdict:
        """Send the frame if it is the next one; the tracker's verdict either way."""
        envelope = _envelope.decode(frame)
        terminal = envelope.type in TERMINAL_TYPES
        verdict = self.tracker.offer(envelope.seq, terminal)
        if verdict is Verdict.DELIVER:
            if terminal and (gate := self._gate()) is not None:
                await gate.wait()
            await self._outlet.send(frame)
        return verdict
