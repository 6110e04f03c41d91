"""The OpenAI-compatible HTTP edge: aiohttp on `--http-port`, in the gateway's process.

It shares the gateway's `Store` (the same scripts and quotas) and `LiveHub` (a stream is a
`Relay`, delivered exactly as to a WebSocket: replay, then live, `SeqTracker` in between).
Per request: the bearer token (or `anonymous` in development mode) and a per-user token
bucket in this gateway (the WebSocket edge's rates: chat-like requests and cancels apart).
A request that starts a generation lives as long as it (at most until its terminal), so the
user's generation limit (`SUBMIT`) bounds those; a resumed stream (`GET ...?stream=true`)
starts none, so it holds one of the user's connection slots while it streams (counted with
the WebSocket connections, across gateways).

Stop: the server cancels a handler whose client disconnected (`handler_cancellation`).
For a chat completion (or a response not in the background) that is a Stop, sent at once
as a WebSocket client's `cancel` is; a background response only detaches (its lease gets
the detach grace, then the worker cancels it as an orphan unless someone resumes it).

Sessions: each generation gets a session of its own, `~http.` + its message id. `~` is not
allowed in a WebSocket client's session ids, so no WebSocket session can be one of these;
its history list (SUBMIT keeps one per session) is deleted once the request is answered: the
request carries the whole conversation.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web

from gateway import GatewayError, SlowConsumer, metrics
from gateway.connection import SendChannel
from gateway.live import Outlet, Relay
from gateway.openai.outlets import ChatOutlet, Collector, ResponseOutlet, SseSink, sse_response
from gateway.requests import GENERATIONS_RETRY_MS, tell_worker
from protocol import openai
from protocol.errors import AuthError, BadRequest
from protocol.ids import issued_ms
from protocol.jobs import Job
from protocol.limits import KeyedBuckets, LogThrottle
from protocol.messages import Chunk, Terminal, server_decoder
from store import Unavailable
from store.retry import REDIS_ERRORS
from store.tasks import Supervisor, cancel_all, spawn

if TYPE_CHECKING:
    from gateway.server import Gateway

log = structlog.get_logger("gateway.openai")

SESSION_PREFIX = "~http."
MAX_BODY_BYTES = 1 << 20
MODELS_CACHE_S = 10.0
"""How long the served models' names are reused for a response's `model` field."""
SLOT_RETRY_S = 1.0
OUTLET_ERRORS = (ConnectionError, SlowConsumer)
"""A client that went away or stopped reading."""


class HttpError(GatewayError):
    """A request answered with OpenAI's error object (`code`: PROTOCOL.md's error codes)."""

    def __init__(self, code: str, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.retry_after_s = retry_after_s


@dataclass(eq=False, slots=True)
class Hold:
    """A request that waits for or streams an answer: its connection slot, the message it
    watches (whose attach lease the gateway refreshes) and how it writes."""

    user: str
    request: web.Request
    message_id: str
    slot: str | None = None
    channel: SendChannel | None = None


class HttpEdge:
    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway
        self.store = gateway.store
        self.config = gateway.config
        q = gateway.config.quotas
        self.holds: set[Hold] = set()
        self._buckets = {"requests": KeyedBuckets(q.request_rate, q.request_burst),
                         "control": KeyedBuckets(q.control_rate, q.control_burst)}
        self._refusal_log = LogThrottle()
        self._ending: set[asyncio.Task[None]] = set()
        self._background = Supervisor()
        self._models: tuple[float, list[str]] = (-MODELS_CACHE_S, [])
        self._runner: web.AppRunner | None = None
        self._port: int | None = None

    # --- lifecycle ----------------------------------------------------------------------

    @property
    def port(self) -> int:
        assert self._port is not None
        return self._port

    async def start(self, host: str, port: int) -> None:
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[self._errors])
        app.router.add_get("/v1/models", self._list_models)
        app.router.add_post("/v1/chat/completions", self._chat_completions)
        app.router.add_post("/v1/responses", self._create_response)
        app.router.add_get("/v1/responses/{id}", self._retrieve_response)
        app.router.add_post("/v1/responses/{id}/cancel", self._cancel_response)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, reuse_address=True)
        await site.start()
        self._port = int(self._runner.addresses[0][1])
        self._background.start(self._sweep, "http-sweep")
        log.info("http_edge_listening", host=host, port=self._port)

    async def close(self) -> None:
        """Stop listening; open requests end as their clients' disconnects would (a streamed
        chat completion is stopped, a background response detaches)."""
        await self._background.close()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._ending:
            await asyncio.wait(set(self._ending), timeout=5.0)

    def watching(self) -> list[str]:
        return [hold.message_id for hold in self.holds]

    def slots(self) -> list[tuple[str, str]]:
        return [(hold.user, hold.slot) for hold in self.holds if hold.slot is not None]

    async def _sweep(self) -> None:
        """Every second: close streams whose client stopped reading, forget full buckets."""
        period = min(1.0, self.config.slow_client_timeout_s / 4)
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for buckets in self._buckets.values():
                buckets.prune(now)
            for hold in list(self.holds):
                if hold.channel is not None and not hold.channel.closed_slow and hold.channel.stalled(now):
                    hold.channel.closed_slow = True
                    metrics.CLOSED.labels("slow_consumer").inc()
                    log.warning("slow_consumer", user=hold.user, message_id=hold.message_id, edge="http")
                    if hold.request.transport is not None:
                        hold.request.transport.abort()

    # --- errors, auth, limits -----------------------------------------------------------

    @web.middleware
    async def _errors(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Every refusal as OpenAI's error object, with its HTTP status."""
        route = request.match_info.route.resource.canonical if request.match_info.route.resource else "other"
        try:
            response = await handler(request)
        except HttpError as exc:
            response = _error_response(exc.code, str(exc), exc.retry_after_s)
        except BadRequest as exc:
            response = _error_response("bad_request", str(exc))
        except Unavailable as exc:
            log.warning("redis_unavailable", error=str(exc), edge="http")
            response = _error_response("unavailable", "the message store is unreachable; try again shortly")
        except web.HTTPException as exc:  # aiohttp's own: unknown path, wrong method, body too large
            code = {404: "not_found", 429: "rate_limited"}.get(exc.status, "bad_request")
            response = _error_response(code, exc.reason if exc.status != 413 else
                                       f"the request body is larger than {MAX_BODY_BYTES} bytes")
            if exc.status == 405:
                response.set_status(405)
        except (asyncio.CancelledError, *OUTLET_ERRORS):
            raise
        except Exception:
            log.exception("http_request_failed", path=request.path)
            response = _error_response("internal", "the gateway failed to handle this request")
        metrics.HTTP_REQUESTS.labels(route, str(response.status)).inc()
        return response

    def _user(self, request: web.Request) -> str:
        """The bearer token's user; any bearer (or none) is `anonymous` without a secret."""
        if self.config.auth_secret is None:
            return "anonymous"
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise HttpError("unauthorized", "send the token as 'Authorization: Bearer TOKEN'")
        try:
            return self.gw.verify(token.strip()).user
        except AuthError as exc:
            raise HttpError("unauthorized", str(exc)) from None

    def _admit(self, request: web.Request, bucket: str) -> str:
        """The request's user, once its bucket has a token for it."""
        user = self._user(request)
        if wait := self._buckets[bucket].take(user, time.monotonic()):
            self._refused(f"{bucket}_rate", user)
            raise HttpError("rate_limited", "too many requests for this user on this gateway; slow down",
                            wait)
        return user

    def _refused(self, limit: str, user: str) -> None:
        metrics.REFUSED.labels(limit).inc()
        if count := self._refusal_log.note(f"{limit}:{user}", time.monotonic()):
            log.warning("limit_refused", limit=limit, user=user, refusals=count, edge="http")

    @contextlib.asynccontextmanager
    async def _hold(self, user: str, request: web.Request, message_id: str, slot: bool) -> AsyncIterator[Hold]:
        """A request that waits for or streams the message's answer, known to the gateway while
        it does (the message's lease, the slow-client sweep); with `slot`, it holds one of the
        user's connection slots meanwhile."""
        hold = Hold(user, request, message_id=message_id)
        limit = self.config.quotas.connections_per_user
        if slot and limit > 0:
            name = self.gw.connection_name()
            lapse_ms = self.config.lifetimes.instance_ttl_s * 1000
            try:
                taken = await self.store.add_connection(user, name, int(time.time() * 1000), lapse_ms, limit)
            except Unavailable as exc:  # let in uncounted, as the WebSocket edge does
                log.warning("connection_slot_unavailable", user=user, error=str(exc), edge="http")
                taken, name = True, ""
            if not taken:
                self._refused("connections", user)
                raise HttpError("rate_limited", f"too many connections for this user (limit {limit})", SLOT_RETRY_S)
            hold.slot = name or None
        self.holds.add(hold)
        try:
            yield hold
        finally:
            self.holds.discard(hold)
            if hold.slot is not None:
                self._after(self._release(user, hold.slot), "http-release-slot")

    async def _release(self, user: str, slot: str) -> None:
        try:
            await self.store.remove_connection(user, slot)
        except Unavailable as exc:
            log.warning("connection_slot_release_failed", user=user, error=str(exc), note="it lapses by itself")

    def _after(self, coro: Any, name: str) -> None:
        """Work that must outlive a handler cancelled by its client's disconnect (owned:
        `close` waits for it)."""
        task = spawn(coro, name)
        self._ending.add(task)
        task.add_done_callback(self._ending.discard)

    # --- generations ----------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _generation(self, user: str, prompt: openai.Prompt) -> AsyncIterator[str]:
        """Queue the prompt's job (SUBMIT, as a WebSocket `chat`); its message id. The
        session's history list that SUBMIT keeps is deleted once the request is answered."""
        mid = self.store.new_message_id(user)
        session = SESSION_PREFIX + mid
        job = Job(
            message_id=mid, user=user, session_id=session, text=prompt.text,
            max_tokens=prompt.max_tokens or self.config.default_max_tokens, created_ms=int(time.time() * 1000),
            temperature=prompt.temperature, seed=prompt.seed, conversation=prompt.conversation,
        )
        limit = self.config.quotas.generations_per_user
        try:
            result = await self.store.submit(job, "", limit)
        except asyncio.CancelledError:
            # The client left while SUBMIT was on its way: a CANCEL sent now follows it on the
            # same connection, so it stops what SUBMIT queued (or finds nothing).
            self._after(self._stop(user, mid), "http-stop")
            self._after(self._forget_history(user, session), "http-forget-history")
            raise
        match result.outcome:
            case "rate_limited":
                self._refused("generations", user)
                raise HttpError("rate_limited", f"you have {limit} generations queued or running; wait for one to end",
                                GENERATIONS_RETRY_MS / 1000)
            case "overloaded":
                raise HttpError("overloaded", "the job queue is full; try again later")
            case "dup" | "busy":
                raise HttpError("internal", f"the new message was refused ({result.outcome})")
        log.info("chat_accepted", message_id=mid, session_id=session, edge="http")
        try:
            yield mid
        finally:
            self._after(self._forget_history(user, session), "http-forget-history")

    async def _forget_history(self, user: str, session: str) -> None:
        try:
            await self.store.clear_history(user, session)
        except REDIS_ERRORS as exc:
            log.warning("http_history_not_cleared", session_id=session, error=str(exc), note="it expires by itself")

    async def _deliver(self, message_id: str, after_seq: int, outlet: Outlet) -> None:
        """Relay the message to `outlet` until its terminal (the gateway refreshes its lease
        meanwhile). `OUTLET_ERRORS` when the client went away."""
        relay = Relay(self.gw.hub, self.store, message_id, after_seq, outlet)
        await relay.run_until_end(OUTLET_ERRORS)

    def _client_gone(self, hold: Hold, stop: bool) -> None:
        """The client of a streamed or awaited answer disconnected: a Stop, or (a
        background response) the detach grace."""
        mid = hold.message_id
        if stop:
            self._after(self._stop(hold.user, mid), "http-stop")
        else:
            self._after(self._detach(mid), "http-detach")

    async def _stop(self, user: str, message_id: str) -> None:
        started = time.perf_counter()
        try:
            status, worker = await self.store.cancel(message_id, user, "disconnected")
        except Unavailable as exc:
            log.warning("disconnect_cancel_failed", message_id=message_id, error=str(exc),
                        note="the attach lease lapses and the worker cancels it as an orphan")
            return
        await tell_worker(self.store, worker, message_id)
        metrics.CANCELS.labels(status).inc()
        log.info("cancel", message_id=message_id, status=status, reason="disconnected", edge="http",
                 worker_id=worker or None, elapsed_ms=round((time.perf_counter() - started) * 1000, 3))

    async def _detach(self, message_id: str) -> None:
        try:
            await self.store.refresh_attach([message_id], self.store.lifetimes.detach_grace_ms)
        except REDIS_ERRORS as exc:
            log.warning("detach_lease_failed", message_id=message_id, error=str(exc), edge="http")

    async def _stream(
        self, request: web.Request, hold: Hold, stop_on_disconnect: bool,
        run: Callable[[SendChannel], Awaitable[None]],
    ) -> web.StreamResponse:
        """Prepare a server-sent event stream and `run` it; a client that goes away (or stops
        reading) is handled by `_client_gone`."""
        response = sse_response(request)
        try:
            await response.prepare(request)
            hold.channel = SendChannel(SseSink(response), self.config.slow_client_timeout_s)
            await run(hold.channel)
        except asyncio.CancelledError:
            self._client_gone(hold, stop_on_disconnect)
            raise
        except OUTLET_ERRORS:
            self._client_gone(hold, stop_on_disconnect)
        return response

    # --- routes ---------------------------------------------------------------------------

    async def _list_models(self, request: web.Request) -> web.Response:
        self._admit(request, "requests")
        try:
            names = await asyncio.wait_for(self._served_models(), timeout=1.0)
        except REDIS_ERRORS as exc:
            log.warning("models_failed", error=str(exc))
            raise HttpError("unavailable", "the worker registry is unreachable; try again shortly") from None
        return _json({"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "tokenrelay"} for name in names]})

    async def _served_models(self) -> list[str]:
        """The models that live workers serve (as `GET /info` lists them)."""
        names = sorted(await self.gw.worker_models())
        self._models = (time.monotonic(), names)
        return names

    async def _model_name(self) -> str:
        """A response's `model` when its request is not at hand: the model the workers
        serve (recent enough), or "" when they serve several or none."""
        stamp, names = self._models
        if time.monotonic() - stamp > MODELS_CACHE_S:
            with contextlib.suppress(*REDIS_ERRORS):
                names = await asyncio.wait_for(self._served_models(), timeout=1.0)
        return names[0] if len(names) == 1 else ""

    async def _chat_completions(self, request: web.Request) -> web.StreamResponse:
        user = self._admit(request, "requests")
        prompt = openai.chat_prompt(await _body(request), self.config.limits)
        async with self._generation(user, prompt) as mid, self._hold(user, request, mid, slot=False) as hold:
            completion = openai.ChatCompletion(mid, prompt.model, int(time.time()))
            if prompt.stream:
                async def run(channel: SendChannel) -> None:
                    await channel.send(completion.opening())
                    await self._deliver(mid, 0, ChatOutlet(channel, completion))

                return await self._stream(request, hold, True, run)
            text, terminal = await self._await_answer(hold, mid)
            problem = openai.terminal_problem(terminal)
            if problem is not None:
                raise HttpError(*problem)
            return _json(completion.whole(text, getattr(terminal, "finish_reason", "stop")))

    async def _await_answer(self, hold: Hold, message_id: str) -> tuple[str, Terminal]:
        """The whole answer; a client that disconnects meanwhile stops it."""
        collector = Collector()
        try:
            await self._deliver(message_id, 0, collector)
        except asyncio.CancelledError:
            self._client_gone(hold, True)
            raise
        assert collector.terminal is not None
        return collector.text, collector.terminal

    async def _create_response(self, request: web.Request) -> web.StreamResponse:
        user = self._admit(request, "requests")
        prompt = openai.responses_prompt(await _body(request), self.config.limits)
        if prompt.background and not prompt.stream:
            async with self._generation(user, prompt) as mid:
                return _json(openai.response_object(self._info(mid, prompt.model, prompt), "queued", ""))
        async with self._generation(user, prompt) as mid, self._hold(user, request, mid, slot=False) as hold:
            info = self._info(mid, prompt.model, prompt)
            if prompt.stream:
                events = openai.ResponseStream(info)

                async def run(channel: SendChannel) -> None:
                    await channel.send(events.opening())
                    await self._deliver(mid, 0, ResponseOutlet(channel, events, self.store, 0))

                return await self._stream(request, hold, not prompt.background, run)
            text, terminal = await self._await_answer(hold, mid)
            return _json(openai.response_object(info, openai.status_of(terminal, ""), text, terminal))

    def _info(self, message_id: str, model: str, prompt: openai.Prompt | None = None) -> openai.ResponseInfo:
        return openai.ResponseInfo(
            message_id, issued_ms(message_id) // 1000, model, background=prompt.background if prompt else True,
            max_output_tokens=prompt.max_tokens if prompt else None, temperature=prompt.temperature if prompt else None,
        )

    async def _owned(self, user: str, message_id: str) -> str:
        """The message's state, if it is the user's; else `not_found` (as for one that never was)."""
        owner = await self.store.message_owner(message_id) if self.store.may_own(user, message_id) else None
        if owner is None or owner.user != user:
            raise HttpError("not_found", f"no response with id {message_id!r} (unknown, expired, or not yours)")
        return owner.state

    async def _snapshot(self, user: str, message_id: str) -> dict[str, Any]:
        """The response object as the store has it now."""
        state = await self._owned(user, message_id)
        text, terminal = openai.fold([server_decoder.decode(f) for f in await self.store.read_log(message_id, 0)])
        info = self._info(message_id, await self._model_name())
        return openai.response_object(info, openai.status_of(terminal, state), text, terminal)

    async def _retrieve_response(self, request: web.Request) -> web.StreamResponse:
        user = self._admit(request, "requests")
        mid = request.match_info["id"]
        if request.query.get("stream", "false").lower() != "true":
            snapshot = await self._snapshot(user, mid)
            if snapshot["status"] in ("queued", "in_progress"):  # a poll keeps it attached
                await self.store.refresh_attach([mid], self.store.lifetimes.detach_grace_ms)
            return _json(snapshot)
        after = _starting_after(request)
        await self._owned(user, mid)
        after_seq = await self._resume_position(mid, after)
        async with self._hold(user, request, mid, slot=True) as hold:
            await self.store.refresh_attach([mid], self.store.lifetimes.detach_grace_ms)
            events = openai.ResponseStream(self._info(mid, await self._model_name()), after)

            async def run(channel: SendChannel) -> None:
                if opening := events.opening():
                    await channel.send(opening)
                await self._deliver(mid, after_seq, ResponseOutlet(channel, events, self.store, after_seq))

            log.info("resume", message_id=mid, starting_after=after, edge="http", gateway_id=self.gw.id)
            return await self._stream(request, hold, False, run)

    async def _resume_position(self, message_id: str, after: int) -> int:
        """The log position to relay from, for `starting_after` = `after`: the chunks the
        client holds; the last chunk's when it holds some of the closing events (they all
        come from the terminal). `bad_request` past the events sent so far."""
        position = openai.log_after(after)
        if position == 0:
            return 0
        page = await self.store.read_log_page(message_id, position - 1, 1)
        if page and page[0][0] == position and isinstance(server_decoder.decode(page[0][1]), Chunk):
            return position
        text_and_end = openai.fold([server_decoder.decode(f) for f in await self.store.read_log(message_id, 0)])
        if text_and_end[1] is not None:  # it ended: the relay delivers the terminal, the events up to `after` left out
            return text_and_end[1].seq or 0
        raise HttpError("bad_request", f"starting_after {after} is past the events sent so far")

    async def _cancel_response(self, request: web.Request) -> web.Response:
        user = self._admit(request, "control")
        mid = request.match_info["id"]
        await self._owned(user, mid)
        status, worker = await self.store.cancel(mid, user, "user")
        if status == "not_found":
            raise HttpError("not_found", f"no response with id {mid!r} (unknown, expired, or not yours)")
        snapshot = await self._snapshot(user, mid)
        await tell_worker(self.store, worker, mid)
        metrics.CANCELS.labels(status).inc()
        log.info("cancel", message_id=mid, status=status, edge="http", gateway_id=self.gw.id, worker_id=worker or None)
        return _json(snapshot)


async def _body(request: web.Request) -> bytes:
    if request.content_type != "application/json":
        raise HttpError("bad_request", "send the body as JSON (Content-Type: application/json)")
    return await request.read()


def _starting_after(request: web.Request) -> int:
    raw = request.query.get("starting_after")
    if raw is None:
        return -1
    try:
        value = int(raw)
    except ValueError:
        raise HttpError("bad_request", f"starting_after must be an integer, got {raw!r}") from None
    if value < 0:
        raise HttpError("bad_request", "starting_after must be 0 or more")
    return value


def _json(body: dict[str, Any]) -> web.Response:
    return web.Response(body=openai.encode(body), content_type="application/json")


def _error_response(code: str, message: str, retry_after_s: float | None = None) -> web.Response:
    status, _kind = openai.ERROR_STATUS.get(code, (500, "server_error"))
    metrics.ERRORS.labels(code if code != "cancelled" else "internal").inc()
    response = web.Response(status=status, body=openai.encode(openai.error_body(code, message)),
                            content_type="application/json")
    if retry_after_s is not None:  # whole seconds, rounded up (HTTP's unit)
        response.headers["Retry-After"] = str(max(1, math.ceil(retry_after_s)))
    return response
