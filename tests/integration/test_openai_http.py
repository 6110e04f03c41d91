"""The OpenAI-compatible HTTP edge at the HTTP level (aiohttp's client): OpenAI's error object
and status for every refusal, limits shared with the WebSocket edge, no history kept, and a
polled background response kept alive. In-process gateway and synthetic worker."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from gateway.server import Gateway
from protocol.auth import mint_token
from protocol.limits import Quotas
from store import keys
from store.settings import Lifetimes
from tests.support import client, gateway, message_id, t, wait_until, worker
from worker.engines.synthetic import SyntheticEngine

SECRET = "http-edge-test-secret-0123456789abcdefgh"
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def token(user: str) -> str:
    return mint_token(SECRET, user, time.time(), 600)


@contextlib.asynccontextmanager
async def edge(redis_url: str, rate: float = 200.0, **config: Any) -> AsyncIterator[tuple[Gateway, aiohttp.ClientSession]]:
    async with gateway(redis_url, http_port=0, **config) as gw, worker(redis_url, [SyntheticEngine(rate=rate)] * 20,
                                                                           orphan_check_s=0.2):
        async with aiohttp.ClientSession(f"http://127.0.0.1:{gw.http.port}" if gw.http else "") as session:
            yield gw, session


async def call(session: aiohttp.ClientSession, method: str, path: str, body: Any = None, user: str | None = "alice",
               **kw: Any) -> tuple[int, dict[str, Any], aiohttp.typedefs.LooseHeaders]:
    headers = dict(kw.pop("headers", {}))
    if user is not None:
        headers.setdefault("Authorization", f"Bearer {token(user)}")
    async with session.request(method, path, json=body, headers=headers, **kw) as response:
        return response.status, await response.json(content_type=None), response.headers


def assert_error(status: int, body: dict[str, Any], expected_status: int, code: str) -> None:
    assert status == expected_status, body
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["code"] == code and body["error"]["message"], body
    assert body["error"]["type"] == {400: "invalid_request_error", 401: "invalid_request_error",
                                     404: "invalid_request_error", 429: "rate_limit_error"}.get(status, "server_error")


async def test_every_refusal_is_openais_error_object_with_its_status(redis_url: str) -> None:
    async with edge(redis_url, auth_secret=SECRET) as (_gw, s):
        assert_error(*(await call(s, "POST", "/v1/chat/completions", CHAT, user=None))[:2], 401, "unauthorized")
        status, body, _h = await call(s, "POST", "/v1/chat/completions", CHAT, user=None,
                                      headers={"Authorization": "Bearer forged.token"})
        assert_error(status, body, 401, "unauthorized")
        assert_error(*(await call(s, "GET", "/v1/models", user=None))[:2], 401, "unauthorized")
        bad_bodies: list[Any] = [
            {**CHAT, "n": 2}, {**CHAT, "tools": [{"type": "function"}]}, {**CHAT, "stop": ["\n"]},
            {**CHAT, "max_tokens": 100_000}, {**CHAT, "temperature": 3}, {**CHAT, "messages": []},
            {**CHAT, "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
            {**CHAT, "messages": [{"role": "tool", "content": "42"}]},
            {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            {**CHAT, "messages": [{"role": "user", "content": "x" * 16_001}]},
            {"model": "m"}, [1, 2],
        ]
        for bad in bad_bodies:
            assert_error(*(await call(s, "POST", "/v1/chat/completions", bad))[:2], 400, "bad_request")
        status, body, _h = await call(s, "POST", "/v1/chat/completions", data=b"{not json",
                                      headers={"Content-Type": "application/json"})
        assert_error(status, body, 400, "bad_request")
        status, body, _h = await call(s, "POST", "/v1/chat/completions", data=b'{"messages": []}',
                                      headers={"Content-Type": "text/plain"})
        assert_error(status, body, 400, "bad_request")
        assert "application/json" in body["error"]["message"]
        for bad in ({"input": "hi", "previous_response_id": "resp_1"}, {"input": [{"type": "function_call_output"}]},
                    {"input": "hi", "text": {"format": {"type": "json_object"}}}):
            assert_error(*(await call(s, "POST", "/v1/responses", bad))[:2], 400, "bad_request")
        assert_error(*(await call(s, "GET", "/v1/nothing"))[:2], 404, "not_found")
        status, body, _h = await call(s, "GET", "/v1/chat/completions")
        assert status == 405 and body["error"]["code"] == "bad_request"
        for unknown in ("resp_123", message_id("anonymous")):
            assert_error(*(await call(s, "GET", f"/v1/responses/{unknown}"))[:2], 404, "not_found")
            assert_error(*(await call(s, "POST", f"/v1/responses/{unknown}/cancel"))[:2], 404, "not_found")
        status, mine, _h = await call(s, "POST", "/v1/responses", {"input": "hi", "max_output_tokens": 2})
        assert status == 200 and mine["status"] == "incomplete"
        for path in (f"/v1/responses/{mine['id']}", f"/v1/responses/{mine['id']}?stream=true"):
            assert_error(*(await call(s, "GET", path, user="bob"))[:2], 404, "not_found")
        assert_error(*(await call(s, "POST", f"/v1/responses/{mine['id']}/cancel", user="bob"))[:2], 404, "not_found")
        status, body, _h = await call(s, "GET", f"/v1/responses/{mine['id']}?stream=true&starting_after=x")
        assert_error(status, body, 400, "bad_request")


async def test_development_mode_any_bearer_or_none_is_anonymous(redis_url: str) -> None:
    async with edge(redis_url) as (_gw, s):
        status, created, _h = await call(s, "POST", "/v1/responses", {"input": "hi", "max_output_tokens": 2},
                                         user=None, headers={"Authorization": "Bearer whatever"})
        assert status == 200
        status, again, _h = await call(s, "GET", f"/v1/responses/{created['id']}", user=None)
        assert status == 200 and again["output"] == created["output"]


async def test_requests_over_the_users_bucket_are_429_with_retry_after(redis_url: str) -> None:
    quotas = Quotas(request_rate=0.5, request_burst=2)
    async with edge(redis_url, auth_secret=SECRET, quotas=quotas) as (_gw, s):
        answers = [await call(s, "GET", "/v1/models") for _ in range(3)]
        assert [a[0] for a in answers] == [200, 200, 429]
        assert_error(answers[2][0], answers[2][1], 429, "rate_limited")
        assert answers[2][2]["Retry-After"] == "2"
        assert (await call(s, "GET", "/v1/models", user="bob"))[0] == 200, "per user"


async def test_a_websocket_chat_and_an_http_one_share_the_users_generation_limit(redis_url: str) -> None:
    quotas = Quotas(generations_per_user=1)
    async with edge(redis_url, rate=20.0, quotas=quotas) as (gw, s), client(gw.port, user="anonymous") as ws:
        mid = await ws.chat("s1", max_tokens=2000)
        status, body, headers = await call(s, "POST", "/v1/chat/completions", CHAT)
        assert_error(status, body, 429, "rate_limited")
        assert headers["Retry-After"] == "1" and "generations" in body["error"]["message"]
        await ws.cancel(message_id=mid)
        status, body, _h = await call(s, "POST", "/v1/chat/completions", CHAT)
        assert status == 200 and body["choices"][0]["finish_reason"] == "length"


async def test_a_resumed_stream_takes_one_of_the_users_connection_slots(redis_url: str) -> None:
    """A request that starts a generation is bounded by the generation limit; a resumed stream
    starts none, so it holds a connection slot, counted with the WebSocket connections."""
    quotas = Quotas(connections_per_user=1)
    async with edge(redis_url, rate=20.0, quotas=quotas) as (gw, s):
        status, created, _h = await call(s, "POST", "/v1/responses",
                                         {"input": "go", "background": True, "max_output_tokens": 2000})
        resume = f"/v1/responses/{created['id']}?stream=true"
        async with client(gw.port, user="anonymous") as ws:
            await ws.request(type="heartbeat")
            assert_error(*(await call(s, "GET", resume))[:2], 429, "rate_limited")
        async with s.get(resume) as streaming:
            assert (await streaming.content.readline()).startswith(b"event: response.created")
            async with client(gw.port) as ws:
                with pytest.raises(ConnectionError):
                    await ws.request(type="heartbeat")
                assert ws.ws.close_code == 4029
        assert (await call(s, "POST", f"/v1/responses/{created['id']}/cancel"))[1]["status"] == "cancelled"


async def test_no_history_is_kept_for_http_sessions(redis_url: str) -> None:
    async with edge(redis_url) as (_gw, s):
        status, body, _h = await call(s, "POST", "/v1/chat/completions", CHAT)
        assert status == 200
        r = aioredis.Redis.from_url(redis_url)
        try:
            async def forgotten() -> bool:
                return not [k async for k in r.scan_iter(match=keys.NS + "{*}:hist:*")]

            await wait_until(forgotten)
            assert not [k async for k in r.scan_iter(match=keys.NS + "{*}:answers:*")]
        finally:
            await r.aclose()


async def test_a_polled_background_response_lives_past_the_detach_grace_and_then_is_orphaned(redis_url: str) -> None:
    async with edge(redis_url, rate=20.0, lifetimes=Lifetimes(detach_grace_s=1.0)) as (_gw, s):
        status, created, _h = await call(s, "POST", "/v1/responses",
                                         {"input": "go", "background": True, "max_output_tokens": 2000})
        assert status == 200 and created["status"] == "queued" and created["background"] is True
        path = f"/v1/responses/{created['id']}"
        polled_until = asyncio.get_running_loop().time() + t(2.5)
        while asyncio.get_running_loop().time() < polled_until:
            status, snapshot, _h = await call(s, "GET", path)
            assert snapshot["status"] in ("queued", "in_progress"), snapshot
            await asyncio.sleep(0.3)

        r = aioredis.Redis.from_url(redis_url)
        try:  # watched in Redis: a GET would keep it attached
            async def orphaned() -> bool:
                return await r.hget(keys.meta(created["id"]), "state") == b"cancelled"

            await wait_until(orphaned, timeout=10)
        finally:
            await r.aclose()
        assert (await call(s, "GET", path))[1]["status"] == "cancelled"


async def test_closing_a_stream_still_queued_cancels_it_at_once(redis_url: str) -> None:
    """The Stop does not wait for a worker: a message still queued ends `cancelled` (seq 0)
    as soon as its client leaves, long before any lease could lapse."""
    async with gateway(redis_url, http_port=0, lifetimes=Lifetimes(detach_grace_s=60.0)) as gw, \
            worker(redis_url, [SyntheticEngine(rate=20.0)], orphan_check_s=0.2), \
            client(gw.port, user="anonymous") as ws, aiohttp.ClientSession() as s:
        assert gw.http is not None
        await ws.chat("busy", max_tokens=2000)  # the only engine is taken
        response = await s.post(f"http://127.0.0.1:{gw.http.port}/v1/chat/completions",
                                json={**CHAT, "stream": True})
        opening = json.loads((await response.content.readline())[6:])
        mid = opening["id"].removeprefix("chatcmpl-")
        response.close()
        r = aioredis.Redis.from_url(redis_url)
        try:
            async def cancelled() -> bool:
                return await r.hget(keys.meta(mid), "state") == b"cancelled"

            await wait_until(cancelled, timeout=5)
            frames = [json.loads(fields[b"f"]) for _id, fields in await r.xrange(keys.log(mid))]
        finally:
            await r.aclose()
        assert frames == [{"type": "cancelled", "message_id": mid, "seq": 0}]
