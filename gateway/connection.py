"""One client connection: authenticate, dispatch requests, relay messages, one send lock.

Every outgoing frame (acks, heartbeat acks, chunks, errors) passes through `send`, which
holds `send_lock` for the whole frame. A send blocks only while the socket's write buffer is
over its limit; the gateway's sweeper closes a connection whose send has been blocked for
`slow_client_timeout_s` (code 4008), so no timer is armed per frame. Heartbeats are answered
by the reader at once; other requests are handled in order by one dispatcher task, so a slow
Redis call never delays a heartbeat.

The limits of PROTOCOL.md's "Security and limits" are checked here, per frame, before any
Redis call: two token buckets (requests; cancel and heartbeat), the bad-input count, and
the user's connection slot (taken once the user is known). A refusal is counted in
`/metrics` and logged at most once a minute per connection and limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol

import structlog
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode

from gateway import SlowConsumer, metrics, requests
from gateway.live import Relay
from gateway.wsout import WebSocketSink
from protocol.errors import AuthError, BadRequest
from protocol.limits import LogThrottle, Strikes, TokenBucket, bucket_of, retry_after_ms
from protocol.messages import (
    Auth,
    AuthOk,
    Cancel,
    Chat,
    ClearHistory,
    ClientMessage,
    Error,
    ErrorCode,
    Heartbeat,
    HeartbeatAck,
    History,
    HistoryCleared,
    HistoryReply,
    Resume,
    ServerMessage,
    encode_text,
)
from protocol.validation import decode_client
from store import Unavailable
from store.retry import REDIS_ERRORS
from store.tasks import cancel_all, spawn

if TYPE_CHECKING:
    from gateway.server import Gateway

log = structlog.get_logger("gateway.connection")

CLOSE_POLICY = 1008
CLOSE_TOKEN_EXPIRED = 4001
CLOSE_SLOW_CONSUMER = 4008
CLOSE_TOO_MANY_CONNECTIONS = 4029
IN_FLIGHT_RETRY_MS = 100
BUCKET_TEXT = {
    "requests": "too many chat, resume, history and clear_history requests on this connection; slow down",
    "control": "too many cancel and heartbeat messages on this connection; slow down",
}


class FrameSink(Protocol):
    """Where `SendChannel` writes text frames (the websockets connection in the gateway)."""

    async def send(self, message: str) -> None:
        """Send one frame, waiting for buffer room if need be."""

    def send_now(self, frame: bytes) -> bool:
        """Write one UTF-8 text frame without waiting if there is room (True); False changes
        nothing."""


class SendChannel:
    """Serialises frames onto one connection; bounded by the socket's write buffer."""

    def __init__(self, sink: FrameSink, timeout_s: float) -> None:
        self.sink = sink
        self.send_lock = asyncio.Lock()
        self.timeout_s = timeout_s
        self._sending_since: float | None = None
        self.closed_slow = False

    async def send(self, frame: str | bytes) -> None:
        """Send one text frame (`bytes` must be UTF-8 JSON, as relayed from the log)."""
        text = frame.decode() if isinstance(frame, bytes) else frame
        async with self.send_lock:
            if self.closed_slow:
                raise SlowConsumer("connection closed for reading too slowly")
            self._sending_since = time.monotonic()
            try:
                await self.sink.send(text)
            finally:
                self._sending_since = None
        metrics.FRAMES_OUT.inc()

    def send_now(self, frame: bytes) -> bool:
        """Write a frame at once when no send is under way and the sink has room; False
        means nothing was written (use `send`)."""
        if self.send_lock.locked() or self.closed_slow or not self.sink.send_now(frame):
            return False
        metrics.FRAMES_OUT.inc()
        return True

    def stalled(self, now: float) -> bool:
        """True once one frame has waited `timeout_s` for the client to read."""
        return self._sending_since is not None and now - self._sending_since > self.timeout_s


class Connection:
    def __init__(self, gateway: Gateway, ws: ServerConnection) -> None:
        self.gw = gateway
        self.ws = ws
        self.channel = SendChannel(
            WebSocketSink(ws, gateway.config.write_limit_bytes), gateway.config.slow_client_timeout_s
        )
        self.user = "anonymous"
        self.relays: dict[str, tuple[Relay, asyncio.Task[None]]] = {}
        self._cancels_in_flight: dict[str, asyncio.Event] = {}
        self.requests: asyncio.Queue[ClientMessage] = asyncio.Queue(gateway.config.max_pending_requests)
        self.authenticated = False
        self.user_fixed = False
        """Whether the user is settled (a token, or in development mode the first message)."""
        self.expires_at: int | None = None
        """When the token in force expires (Unix seconds); the gateway's sweep closes the
        connection with 4001 then. None in development mode."""
        self.slot: tuple[str, str] | None = None
        """(user, name) of the connection slot this connection holds, if any."""
        self.closing = False
        self.closed_with: ConnectionClosed | None = None
        """How the connection closed under the reader, if it did (`ping_timed_out`)."""
        self._closer: asyncio.Task[None] | None = None
        q = gateway.config.quotas
        now = time.monotonic()
        self._buckets = {
            "requests": TokenBucket(q.request_rate, q.request_burst, now),
            "control": TokenBucket(q.control_rate, q.control_burst, now),
        }
        self._bad_input = Strikes(q.bad_requests, q.bad_request_window_s)
        self._refusal_log = LogThrottle()

    @property
    def ping_timed_out(self) -> bool:
        """websockets closed the connection with 1011 while it was open and the client had
        sent no close frame: its keepalive ping went unanswered (the gateway never sends
        1011 itself)."""
        closed = self.closed_with
        return (
            closed is not None
            and closed.rcvd is None
            and closed.sent is not None
            and closed.sent.code == CloseCode.INTERNAL_ERROR
        )

    # --- sending ------------------------------------------------------------------------

    async def close(self, code: int, reason: str, counted_as: str) -> None:
        """Start closing the connection (once). The close handshake runs in its own task
        while the reader drains and drops what the client still sends: a reader waiting
        for the client's close frame would leave it stuck behind a full receive queue."""
        if self.closing:
            return
        self.closing = True
        metrics.CLOSED.labels(counted_as).inc()
        self._closer = spawn(self.ws.close(code, reason), "close")

    async def close_slow(self) -> None:
        """Close with 4008. The close frame queues behind the unread data; a client that
        never reads is cut off after the close timeout."""
        if self.channel.closed_slow:
            return
        self.channel.closed_slow = True
        metrics.CLOSED.labels("slow_consumer").inc()
        log.warning("slow_consumer", user=self.user, timeout_s=self.channel.timeout_s)
        await self.ws.close(CLOSE_SLOW_CONSUMER, "slow consumer")

    async def reply(self, message: ServerMessage) -> None:
        await self.channel.send(encode_text(message))

    async def error(
        self,
        code: ErrorCode,
        text: str,
        request_id: str | None = None,
        message_id: str | None = None,
        retry_after_ms: int | None = None,
    ) -> None:
        metrics.ERRORS.labels(code).inc()
        await self.reply(
            Error(code=code, message=text, request_id=request_id, message_id=message_id, retry_after_ms=retry_after_ms)
        )
        if code == "bad_request" and self._bad_input.add(time.monotonic()):
            q = self.gw.config.quotas
            self.refused("bad_input")
            await self.close(
                CLOSE_POLICY, f"{q.bad_requests} bad requests within {q.bad_request_window_s:g} s", "bad_input"
            )

    def refused(self, limit: str, **context: object) -> None:
        """Count a refusal by `limit`; log it at most once a minute for this connection."""
        metrics.REFUSED.labels(limit).inc()
        if count := self._refusal_log.note(limit, time.monotonic()):
            log.warning("limit_refused", limit=limit, user=self.user, refusals=count, **context)

    async def rate_limited(self, limit: str, text: str, wait_ms: int, request_id: str | None = None) -> None:
        self.refused(limit)
        await self.error("rate_limited", text, request_id, retry_after_ms=wait_ms)

    # --- lifecycle ----------------------------------------------------------------------

    async def serve(self) -> None:
        dispatcher = spawn(self._dispatch(), "dispatch")
        try:
            if not await self._authenticate():
                return
            self.authenticated = True
            async for raw in self.ws:
                if not self.closing:
                    await self._on_frame(raw)
        except ConnectionClosed as exc:
            self.closed_with = exc
        except SlowConsumer:
            pass
        finally:
            await cancel_all([dispatcher])
            await self._detach()
            await self._release_slot()
            if self._closer is not None:
                await asyncio.wait([self._closer])

    async def _authenticate(self) -> bool:
        """With a secret: the first message must be `auth` with a valid token, within the
        auth timeout; then the user's connection slot. Without: nothing yet (`_on_frame`)."""
        if self.gw.config.auth_secret is None:
            return True
        try:
            async with asyncio.timeout(self.gw.config.auth_timeout_s):
                raw = await self.ws.recv()
        except TimeoutError:
            await self.close(CLOSE_POLICY, "auth timeout", "auth")
            return False
        try:
            message = decode_client(raw)
            if not isinstance(message, Auth) or message.token is None:
                raise AuthError("the first message must be auth with a token")
            claims = self.gw.verify(message.token)
        except (BadRequest, AuthError) as exc:
            await self._unauthorized(str(exc))
            return False
        return await self._settle(claims.user, claims.exp)

    async def _unauthorized(self, why: str) -> None:
        """PROTOCOL.md: `error` `unauthorized`, then close 1008."""
        await self.error("unauthorized", why)
        await self.close(CLOSE_POLICY, why[:120], "auth")

    async def _settle(self, user: str, expires_at: int | None, answer: bool = True) -> bool:
        """Fix the connection's user and take its connection slot; then `auth_ok` if it
        answers an `auth` (`answer`), or close 4029 when the user has no slot left."""
        self.user, self.user_fixed = user, True
        if not await self._take_slot():
            self.refused("connections")
            limit = self.gw.config.quotas.connections_per_user
            await self.close(CLOSE_TOO_MANY_CONNECTIONS, f"too many connections for this user (limit {limit})",
                             "too_many_connections")
            return False
        self.expires_at = expires_at
        if answer:
            await self.reply(AuthOk(user=user, expires_at=expires_at))
        return True

    async def _take_slot(self) -> bool:
        """One of the user's connection slots, counted across gateways. With Redis
        unreachable the connection is let in uncounted (it could do nothing else either)."""
        limit = self.gw.config.quotas.connections_per_user
        if limit <= 0:
            return True
        name = self.gw.connection_name()
        lapse_ms = self.gw.config.lifetimes.instance_ttl_s * 1000
        try:
            taken = await self.gw.store.add_connection(self.user, name, int(time.time() * 1000), lapse_ms, limit)
        except Unavailable as exc:
            log.warning("connection_slot_unavailable", user=self.user, error=str(exc))
            return True
        if taken:
            self.slot = (self.user, name)
        return taken

    async def _release_slot(self) -> None:
        slot, self.slot = self.slot, None
        if slot is None:
            return
        try:
            await self.gw.store.remove_connection(*slot)
        except Unavailable as exc:
            log.warning("connection_slot_release_failed", user=slot[0], error=str(exc), note="it lapses by itself")

    async def _on_frame(self, raw: str | bytes) -> None:
        try:
            message = decode_client(raw, self.gw.config.limits)
        except BadRequest as exc:
            await self.error("bad_request", str(exc), request_id=exc.request_id)
            return
        metrics.MESSAGES_IN.labels(type(message).__name__.lower()).inc()
        if not self.user_fixed and not isinstance(message, Auth):  # development mode: no auth, anonymous
            if not await self._settle("anonymous", None, answer=False):
                return
        bucket = bucket_of(message)
        if bucket is not None and (wait := self._buckets[bucket].take(time.monotonic())):
            await self.rate_limited(f"{bucket}_rate", BUCKET_TEXT[bucket], retry_after_ms(wait), _rid(message))
            return
        match message:
            case Heartbeat(ts=ts):
                metrics.HEARTBEATS.inc()
                await self.reply(HeartbeatAck(server_ts=time.time(), ts=ts))
            case Auth(user=user, token=token):
                await self._reauth(user, token)
            case _:
                try:
                    self.requests.put_nowait(message)
                except asyncio.QueueFull:
                    await self.rate_limited("in_flight", "too many requests in flight on this connection",
                                            IN_FLIGHT_RETRY_MS, _rid(message))

    async def _reauth(self, user: str | None, token: str | None) -> None:
        """A later `auth`. With a secret: a fresh token for the same user extends the
        connection; anything else is `unauthorized` and closes it (1008). Without one: the
        first names the user; a later one may only name the same user."""
        if self.gw.config.auth_secret is not None:
            if token is None:
                await self._unauthorized("auth needs a token on this gateway")
                return
            try:
                claims = self.gw.verify(token)
            except AuthError as exc:
                await self._unauthorized(str(exc))
                return
            if claims.user != self.user:
                await self._unauthorized("a token for another user cannot be used on this connection")
                return
            self.expires_at = claims.exp
            await self.reply(AuthOk(user=self.user, expires_at=claims.exp))
            return
        if token is not None and user is None:
            await self.error("unauthorized", "this gateway has no auth secret: name the user with \"user\"")
            return
        name = user or "anonymous"
        if not self.user_fixed:
            await self._settle(name, None)
        elif name != self.user:
            await self._unauthorized("this connection already belongs to another user")
        else:
            await self.reply(AuthOk(user=self.user))

    async def _dispatch(self) -> None:
        """Handle requests in order until the connection is gone (the reader's end then
        cleans up: a reply to a closed connection is no crash)."""
        try:
            while True:
                await self._handle(await self.requests.get())
        except (ConnectionClosed, SlowConsumer):
            return

    async def _handle(self, message: ClientMessage) -> None:
        try:
            match message:
                case Chat():
                    await requests.chat(self, message)
                case Cancel():
                    await requests.cancel(self, message)
                case Resume():
                    await requests.resume(self, message)
                case History(session_id=sid):
                    turns = await self.gw.store.history(self.user, sid)
                    await self.reply(HistoryReply(session_id=sid, turns=turns))
                case ClearHistory(session_id=sid):
                    await self.gw.store.clear_history(self.user, sid)
                    await self.reply(HistoryCleared(session_id=sid))
        except Unavailable as exc:
            log.warning("redis_unavailable", error=str(exc))
            await self.error("unavailable", "the message store is unreachable; try again shortly", _rid(message))
        except (ConnectionClosed, SlowConsumer):
            raise
        except Exception:
            log.exception("request_failed", request=type(message).__name__)
            await self.error("internal", "the gateway failed to handle this request", _rid(message))

    # --- relays -------------------------------------------------------------------------

    def relay(self, message_id: str, after_seq: int) -> None:
        """Start (or restart from `after_seq`) relaying a message to this connection."""
        previous = self.relays.pop(message_id, None)
        if previous is not None:
            previous[1].cancel()
        relay = Relay(
            self.gw.hub, self.gw.store, message_id, after_seq, self.channel, self._terminal_gate, self.channel.send_now
        )
        task = spawn(self._run_relay(relay), f"relay-{message_id}")
        self.relays[message_id] = (relay, task)

    async def _run_relay(self, relay: Relay) -> None:
        """Run a relay to its message's end (`Relay.run_until_end`), then forget it."""
        try:
            await relay.run_until_end((ConnectionClosed, SlowConsumer))
        except (ConnectionClosed, SlowConsumer):
            return
        current = self.relays.get(relay.message_id)
        if current is not None and current[0] is relay:
            del self.relays[relay.message_id]

    @contextlib.contextmanager
    def cancel_result_first(self, message_id: str) -> Iterator[None]:
        """While a cancel of `message_id` is answered on this connection, its terminal waits:
        the store publishes `cancelled` before it answers the gateway, and PROTOCOL.md has
        `cancel_result` (`cancelling`: the terminal follows) come first."""
        held = self._cancels_in_flight[message_id] = asyncio.Event()
        try:
            yield
        finally:
            held.set()
            if self._cancels_in_flight.get(message_id) is held:
                del self._cancels_in_flight[message_id]

    def _terminal_gate(self, message_id: str) -> asyncio.Event | None:
        """What the message's terminal frame must wait for: the cancel being answered here."""
        return self._cancels_in_flight.get(message_id)

    def watching(self) -> list[str]:
        return [mid for mid, (relay, _t) in self.relays.items() if not relay.finished]

    async def _detach(self) -> None:
        """A closed connection is not a Stop: unfinished messages get the detach grace."""
        unfinished = self.watching()
        await cancel_all([task for _relay, task in self.relays.values()])
        self.relays.clear()
        if unfinished:
            try:
                await self.gw.store.refresh_attach(unfinished, self.gw.store.lifetimes.detach_grace_ms)
            except REDIS_ERRORS as exc:
                log.warning("detach_lease_failed", error=str(exc))


def _rid(message: ClientMessage) -> str | None:
    return message.request_id if isinstance(message, Chat) else None
