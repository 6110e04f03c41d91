"""One simulated user of the load test: a WebSocket connection that chats, cancels, drops and
resumes, and feeds everything it receives to the protocol `Checker`.

A client sends one chat, reads its stream to the terminal event, then sends the next. Per
message it draws a `Plan`: maybe a cancel (before `accepted` by `session_id`, right after
it, or after N chunks; half of the cancels go over a second connection of the same user to
another gateway), maybe a drop after N chunks (close the socket, connect to the next
gateway, `resume` with the last seq held). Every frame is time-stamped by the reader task
that received it, so latencies do not include the client's own queueing.

A refusal (an `error` with neither request_id nor message_id, e.g. `unavailable` while Redis
restarts) answers the resume or the cancel outstanding on that connection, as a careful client
reads it: a refused resume is sent again over a new connection, a refused cancel counts as
answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from bench.checker import Checker, Frame, is_stream_event
from bench.loadconfig import LoadConfig, Plan, Results, draw_plan
from protocol.auth import mint_token

SECONDARY = -1
"""Generation tag of frames from the second (cancel) connection."""
RESUME_RETRY_S = 0.5
"""Pause before a refused `resume` is sent again (over a new connection)."""


class ClientAborted(Exception):
    """The client cannot go on (cannot connect, or auth refused)."""


@dataclass(slots=True)
class Conn:
    ws: ClientConnection
    gen: int
    url: str
    reader: asyncio.Task[None]


@dataclass(slots=True)
class Pending:
    """The message in flight on this client."""

    request_id: str
    sent_at: float
    plan: Plan
    message_id: str | None = None
    refused: bool = False
    last_event: float = 0.0
    last_chunk_at: float | None = None
    cancel_sent_at: float | None = None
    cancel_gen: int | None = None
    cancel_answered: bool = False
    dropped: bool = False
    resume_gen: int | None = None
    """The connection a resume was sent on, until the message's next event comes."""


class LoadClient:
    def __init__(self, index: int, config: LoadConfig, results: Results, checker: Checker) -> None:
        self.index = index
        self.config = config
        self.results = results
        self.checker = checker
        self.rng = random.Random(f"{config.seed}:{index}")
        self.user = f"{config.user_prefix}{index}"
        self.session_id = f"lt-{config.run_id}-{index}"
        self.url_index = index % len(config.urls)
        self.inbox: asyncio.Queue[tuple[int, Frame, float]] = asyncio.Queue()
        self.primary: Conn | None = None
        self.secondary: Conn | None = None
        self.gen = 0
        self.stream_gen: dict[str, int] = {}
        """Per message id: the primary connection generation whose stream events count."""
        self.heartbeats: dict[float, float] = {}
        self._closing: set[asyncio.Task[None]] = set()

    # --- connections ------------------------------------------------------------------

    async def _open(self, url: str, gen: int) -> Conn:
        try:
            ws = await connect(url, open_timeout=self.config.connect_timeout_s)
            if self.config.auth_secret:
                token = mint_token(self.config.auth_secret, self.user, time.time())
                await ws.send(json.dumps({"type": "auth", "token": token}))
            else:
                await ws.send(json.dumps({"type": "auth", "user": self.user}))
        except (OSError, TimeoutError, ConnectionClosed) as exc:
            raise ClientAborted(f"client {self.index}: cannot connect to {url}: {exc!r}") from None
        return Conn(ws, gen, url, asyncio.create_task(self._read(ws, gen)))

    async def _read(self, ws: ClientConnection, gen: int) -> None:
        put = self.inbox.put_nowait
        with contextlib.suppress(ConnectionClosed):
            async for raw in ws:
                try:
                    frame = json.loads(raw)
                except ValueError:
                    self.checker.violation(f"client {self.index}: a frame that is not JSON: {raw[:200]!r}")
                    continue
                if not isinstance(frame, dict):
                    self.checker.violation(f"client {self.index}: a frame that is not a JSON object: {frame!r}")
                    continue
                put((gen, frame, time.perf_counter()))
        put((gen, {"type": "_closed", "code": ws.close_code}, time.perf_counter()))

    def _close_later(self, conn: Conn) -> None:
        task = asyncio.create_task(self._close(conn))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    @staticmethod
    async def _close(conn: Conn) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(conn.ws.close(), 5.0)
        conn.reader.cancel()
        await asyncio.gather(conn.reader, return_exceptions=True)

    async def _connect_primary(self) -> Conn:
        """Connect to the current gateway, else the next ones in turn (as a balancer skips a
        dead backend); when none answers, go round again with backoff for the config's
        `reconnect_window_s`, then `ClientAborted`."""
        urls = self.config.urls
        give_up = time.perf_counter() + self.config.reconnect_window_s
        backoff = 0.2
        while True:
            for attempt in range(len(urls)):
                try:
                    self.primary = await self._open(urls[self.url_index], self.gen)
                    return self.primary
                except ClientAborted:
                    if attempt == len(urls) - 1 and time.perf_counter() + backoff > give_up:
                        raise
                    self.results.errors["connect_failed"] += 1
                    self.url_index = (self.url_index + 1) % len(urls)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    async def _reconnect(self) -> Conn:
        """A new primary connection to the next gateway (round-robin, as a balancer would)."""
        if self.primary is not None:
            self._close_later(self.primary)
        self.gen += 1
        self.url_index = (self.url_index + 1) % len(self.config.urls)
        return await self._connect_primary()

    async def _send(self, conn: Conn | None, message: dict[str, Any]) -> bool:
        if conn is None:
            return False
        try:
            await conn.ws.send(json.dumps(message))
        except ConnectionClosed:
            return False
        return True

    async def _secondary(self) -> Conn:
        if self.secondary is None or self.secondary.reader.done():
            url = self.config.urls[(self.url_index + 1) % len(self.config.urls)]
            self.secondary = await self._open(url, SECONDARY)
        return self.secondary

    # --- the run ----------------------------------------------------------------------

    async def run(self, deadline: float | None, on_message: Callable[[], None]) -> None:
        await asyncio.sleep(self.config.ramp_s * self.index / max(self.config.clients, 1))
        hb: asyncio.Task[None] | None = None
        try:
            await self._connect_primary()
            if self.config.heartbeat_s > 0:
                hb = asyncio.create_task(self._heartbeats())
            sent = 0
            while True:
                if self.config.messages is not None and sent >= self.config.messages:
                    break
                if deadline is not None and time.perf_counter() >= deadline:
                    break
                sent += 1
                await self._one_message(sent)
                on_message()
        except ClientAborted as exc:
            self.checker.violation(str(exc))
        finally:
            if hb is not None:
                hb.cancel()
                await asyncio.gather(hb, return_exceptions=True)
            for conn in (self.primary, self.secondary):
                if conn is not None:
                    self._close_later(conn)
            await asyncio.gather(*self._closing, return_exceptions=True)

    async def _heartbeats(self) -> None:
        await asyncio.sleep(self.rng.uniform(0, self.config.heartbeat_s))
        while True:
            ts = time.time()
            self.heartbeats[ts] = time.perf_counter()
            await self._send(self.primary, {"type": "heartbeat", "ts": ts})
            await asyncio.sleep(self.config.heartbeat_s)

    async def _one_message(self, n: int) -> None:
        plan = draw_plan(self.rng, self.config)
        p = Pending(f"{self.config.run_id}-{self.index}-{n}", time.perf_counter(), plan)
        p.last_event = p.sent_at
        self.results.messages += 1
        chat = {"type": "chat", "session_id": self.session_id, "text": f"load test {n}",
                "request_id": p.request_id, "max_tokens": self.config.max_tokens}
        if not await self._send(self.primary, chat):
            await self._reconnect()
            await self._send(self.primary, chat)
        if plan.cancel_at == -1:
            await self._cancel(p, {"type": "cancel", "session_id": self.session_id}, "before_accepted")
        while not self._settled(p):
            try:
                gen, frame, at = self.inbox.get_nowait()
            except asyncio.QueueEmpty:
                wait = self._deadline(p) - time.perf_counter()
                try:
                    gen, frame, at = await asyncio.wait_for(self.inbox.get(), max(wait, 0.0))
                except TimeoutError:
                    self._time_out(p)
                    return
            await self._on_frame(p, gen, frame, at)

    def _deadline(self, p: Pending) -> float:
        track = self.checker.messages.get(p.message_id or "")
        if track is not None and track.terminal is not None:
            return (p.cancel_sent_at or p.last_event) + self.config.cancel_result_timeout_s
        return p.last_event + self.config.terminal_timeout_s

    def _settled(self, p: Pending) -> bool:
        """Done with this message: refused, or terminal seen and our cancel answered."""
        if p.message_id is None:
            return p.refused
        track = self.checker.messages[p.message_id]
        if track.terminal is None:
            return False
        return p.cancel_sent_at is None or p.cancel_answered or p.cancel_gen not in (self.gen, SECONDARY)

    def _time_out(self, p: Pending) -> None:
        if p.message_id is None:
            self.checker.violation(f"request {p.request_id}: neither accepted nor refused within "
                                   f"{self.config.terminal_timeout_s}s")
        elif self.checker.messages[p.message_id].terminal is None:
            self.checker.expire(p.message_id, f"{self.config.terminal_timeout_s}s after its last event")
        else:
            self.checker.violation(f"{p.message_id}: no cancel_result within {self.config.cancel_result_timeout_s}s")

    async def _cancel(self, p: Pending, message: dict[str, Any], moment: str) -> None:
        conn, via, gen = self.primary, "primary", self.gen
        if p.plan.cancel_secondary:
            try:
                conn, via, gen = await self._secondary(), "secondary", SECONDARY
            except ClientAborted:
                self.results.errors["secondary_connect_failed"] += 1
        p.cancel_sent_at = time.perf_counter()
        p.cancel_gen = gen
        if await self._send(conn, message):
            self.results.cancels_sent[f"{moment}/{via}"] += 1
        else:
            p.cancel_sent_at = None

    async def _on_frame(self, p: Pending, gen: int, frame: Frame, at: float) -> None:
        kind = frame.get("type")
        if kind == "_closed":
            await self._on_closed(p, gen, frame)
            return
        if is_stream_event(frame):
            if self.stream_gen.get(frame["message_id"], gen) != gen:
                return  # from a connection we dropped: the resume replays it
            self._on_stream_event(p, frame, at)
            if frame["message_id"] == p.message_id and kind == "chunk":
                await self._after_chunk(p)
            return
        match kind:
            case "accepted" if frame.get("request_id") == p.request_id:
                await self._on_accepted(p, gen, frame, at)
            case "cancel_result":
                self._on_cancel_result(p, gen, frame)
            case "heartbeat_ack":
                sent = self.heartbeats.pop(frame.get("ts") or 0.0, None)
                if sent is not None:
                    self.results.heartbeat_rtt_s.append(at - sent)
            case "error":
                self.results.errors[str(frame.get("code"))] += 1
                if frame.get("request_id") == p.request_id and p.message_id is None:
                    p.refused = True  # nothing more will come for it
                elif frame.get("request_id") is None and frame.get("message_id") is None:
                    await self._on_refusal(p, gen)
            case "auth_ok" | "accepted":
                pass
            case _:
                self.checker.violation(f"client {self.index}: unexpected frame {frame!r}")

    async def _on_refusal(self, p: Pending, gen: int) -> None:
        if p.message_id is not None and p.resume_gen == gen == self.gen:
            self.results.errors["resume_refused"] += 1
            await asyncio.sleep(RESUME_RETRY_S)
            await self._reconnect()
            await self._resume(p)
        elif p.cancel_sent_at is not None and gen == p.cancel_gen and not p.cancel_answered:
            p.cancel_answered = True
            self.results.cancel_results["refused"] += 1

    async def _on_accepted(self, p: Pending, gen: int, frame: Frame, at: float) -> None:
        p.message_id = str(frame["message_id"])
        self.stream_gen[p.message_id] = gen
        p.last_event = at
        self.results.accepted += 1
        self.checker.accepted(p.message_id)
        if p.plan.cancel_at == 0:
            await self._cancel(p, {"type": "cancel", "message_id": p.message_id}, "after_accepted")

    def _on_stream_event(self, p: Pending, frame: Frame, at: float) -> None:
        track = self.checker.feed(frame)
        if track is None or frame["message_id"] != p.message_id:
            return
        p.last_event = at
        p.resume_gen = None
        if frame["type"] == "chunk":
            self.results.chunks += 1
            text = frame.get("text")
            self.results.tokens += len(text.split()) if isinstance(text, str) else 0
            if track.chunks == 1:
                self.results.ttft_s.append(at - p.sent_at)
            elif p.last_chunk_at is not None:
                self.results.gaps_s.append(at - p.last_chunk_at)
            p.last_chunk_at = at
            return
        self.results.terminals[frame["type"]] += 1
        if frame["type"] == "error":
            self.results.errors[str(frame.get("code"))] += 1
        if frame["type"] == "cancelled" and p.cancel_sent_at is not None:
            self.results.cancel_latency_s.append(at - p.cancel_sent_at)

    async def _after_chunk(self, p: Pending) -> None:
        assert p.message_id is not None
        track = self.checker.messages[p.message_id]
        if track.terminal is not None:
            return
        plan = p.plan
        if plan.cancel_at is not None and plan.cancel_at > 0 and p.cancel_sent_at is None and track.chunks >= plan.cancel_at:
            await self._cancel(p, {"type": "cancel", "message_id": p.message_id}, "after_chunks")
        if plan.drop_at is not None and not p.dropped and track.chunks >= plan.drop_at:
            p.dropped = True
            self.results.reconnects += 1
            await self._reconnect()
            await self._resume(p)

    async def _resume(self, p: Pending) -> None:
        """Re-attach the message in flight to the (new) primary connection."""
        assert p.message_id is not None and self.primary is not None
        self.stream_gen[p.message_id] = self.primary.gen
        p.last_chunk_at = None  # the replay after the seam is a burst: not an inter-chunk gap
        after_seq = self.checker.messages[p.message_id].last_seq
        self.checker.resumed(p.message_id, after_seq)
        p.resume_gen = self.primary.gen
        await self._send(self.primary, {"type": "resume", "message_id": p.message_id, "after_seq": after_seq})

    def _on_cancel_result(self, p: Pending, gen: int, frame: Frame) -> None:
        status = str(frame.get("status"))
        self.results.cancel_results[status] += 1
        self.checker.cancel_result(frame, p.message_id)
        if gen == p.cancel_gen:
            p.cancel_answered = True

    async def _on_closed(self, p: Pending, gen: int, frame: Frame) -> None:
        if gen == SECONDARY:
            if self.secondary is not None and self.secondary.reader.done():
                self.secondary = None
            return
        if gen != self.gen:
            return  # a connection we dropped on purpose
        code = frame.get("code")
        self.results.closes[str(code)] += 1
        if code == 1008:
            raise ClientAborted(f"client {self.index}: closed by the gateway with 1008 (auth or policy)")
        self.results.unplanned_reconnects += 1
        await self._reconnect()
        if p.message_id is None:
            p.refused = True  # we cannot know whether the chat was accepted: move on
            self.results.errors["connection_lost_before_accepted"] += 1
        elif self.checker.messages[p.message_id].terminal is None:
            await self._resume(p)
