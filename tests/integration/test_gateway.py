"""The foundation through the public interface: real Redis, gateway, worker, WebSocket clients."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from websockets.exceptions import ConnectionClosed

from protocol.auth import mint_token
from tests.support import assert_stream_ok, client, gateway, http_get, t, worker

SECRET = "test-secret-of-at-least-32-bytes-0123456789"


async def test_chat_streams_contiguous_chunks_then_done(redis_url: str) -> None:
    async with gateway(redis_url) as gw, worker(redis_url), client(gw.port, "alice") as c:
        mid = await c.chat("s1", "hello there", max_tokens=12, request_id="r-1")
        done = await c.terminal(mid)
        assert done == {"type": "done", "message_id": mid, "seq": len(c.chunks(mid)), "finish_reason": "length"}
        assert_stream_ok(c, mid)
        assert len(c.text(mid).split()) == 12
        accepted = next(f for f in c.frames if f["type"] == "accepted")
        assert accepted == {"type": "accepted", "request_id": "r-1", "session_id": "s1", "message_id": mid}


async def test_anonymous_user_without_auth_message(redis_url: str) -> None:
    async with gateway(redis_url) as gw, worker(redis_url), client(gw.port) as c:
        mid = await c.chat("s1", max_tokens=3)
        assert (await c.terminal(mid))["type"] == "done"
        history = await c.request(type="history", session_id="s1")
        assert [turn["role"] for turn in history["turns"]] == ["user", "assistant"]


async def test_heartbeat_answered_between_chunks_of_a_running_stream(redis_url: str) -> None:
    async with gateway(redis_url) as gw, worker(redis_url, rate_engines(40.0)), client(gw.port, "alice") as c:
        mid = await c.chat("s1", max_tokens=40)
        await c.wait_for(lambda f: f["type"] == "chunk" and f["seq"] == 2)
        before = len(c.chunks(mid))
        ack = await c.request(type="heartbeat", ts=123.5)
        assert ack["type"] == "heartbeat_ack" and ack["ts"] == 123.5
        assert abs(ack["server_ts"] - time.time()) < 60
        await c.terminal(mid)
        index = c.frames.index(ack)
        chunk_seqs_before_ack = [f["seq"] for f in c.frames[:index] if f["type"] == "chunk"]
        assert before <= len(chunk_seqs_before_ack) < 40, "the ack must arrive while the stream runs"
        assert_stream_ok(c, mid)


def rate_engines(rate: float) -> list:  # type: ignore[type-arg]
    from worker.engines.synthetic import SyntheticEngine

    return [SyntheticEngine(rate=rate)] * 10


MALFORMED = [
    ("{not json", "malformed JSON"),
    ("[1, 2]", "JSON object"),
    ('{"text": "no type"}', "type"),
    ('{"type": "fly"}', "type"),
    ('{"type": "chat", "session_id": "s1"}', "text"),
    ('{"type": "chat", "session_id": "s1", "text": ""}', "text"),
    ('{"type": "chat", "session_id": "bad id!", "text": "x"}', "session_id"),
    ('{"type": "chat", "session_id": "s1", "text": "x", "max_tokens": 0}', "max_tokens"),
    ('{"type": "chat", "session_id": "s1", "text": "x", "max_tokens": 100000}', "max_tokens"),
    ('{"type": "chat", "session_id": "s1", "text": "x", "colour": "red"}', "colour"),
    ('{"type": "resume", "message_id": "m1", "after_seq": -1}', "after_seq"),
    ('{"type": "heartbeat", "ts": "soon"}', "ts"),
    ('{"type": "cancel"}', "message_id or session_id"),
]


@pytest.mark.parametrize(("frame", "mentions"), MALFORMED)
async def test_malformed_input_answers_bad_request_and_connection_keeps_working(
    redis_url: str, frame: str, mentions: str
) -> None:
    async with gateway(redis_url) as gw, worker(redis_url), client(gw.port, "alice") as c:
        start = len(c.frames)
        await c.ws.send(frame)
        error = await c.wait_for(lambda f: f["type"] == "error", start=start)
        assert error["code"] == "bad_request"
        assert mentions in error["message"], error["message"]
        mid = await c.chat("s1", max_tokens=3)
        assert (await c.terminal(mid))["type"] == "done"


async def test_bad_request_echoes_request_id_and_text_limit(redis_url: str) -> None:
    async with gateway(redis_url) as gw, client(gw.port, "alice") as c:
        too_long = "x" * 16_001
        error = await c.request(type="chat", session_id="s1", text=too_long, request_id="big")
        assert error["code"] == "bad_request" and error["request_id"] == "big"
        assert "too long" in error["message"]


async def test_binary_frame_answers_bad_request(redis_url: str) -> None:
    async with gateway(redis_url) as gw, client(gw.port, "alice") as c:
        start = len(c.frames)
        await c.ws.send(b"\x00\x01")
        error = await c.wait_for(lambda f: f["type"] == "error", start=start)
        assert error["code"] == "bad_request" and "binary" in error["message"]
        assert (await c.request(type="heartbeat"))["type"] == "heartbeat_ack"


async def test_frame_over_size_limit_closes_with_1009(redis_url: str) -> None:
    async with gateway(redis_url, max_frame_bytes=4096) as gw, client(gw.port, "alice") as c:
        await c.send(type="chat", session_id="s1", text="x" * 5000)
        with pytest.raises(ConnectionError):
            await c.wait_for(lambda f: False, timeout=5)
        assert c.ws.close_code == 1009


async def test_history_keeps_turns_and_clear_history_forgets_them(redis_url: str) -> None:
    async with gateway(redis_url) as gw, worker(redis_url), client(gw.port, "alice") as c:
        first = await c.chat("s1", "first question", max_tokens=4)
        await c.terminal(first)
        second = await c.chat("s1", "second question", max_tokens=5)
        await c.terminal(second)
        history = await c.request(type="history", session_id="s1")
        assert history["session_id"] == "s1"
        assert [(t["role"], t["message_id"], t["status"]) for t in history["turns"]] == [
            ("user", first, "complete"),
            ("assistant", first, "complete"),
            ("user", second, "complete"),
            ("assistant", second, "complete"),
        ]
        assert history["turns"][0]["text"] == "first question"
        assert history["turns"][3]["text"] == c.text(second)
        async with client(gw.port, "bob") as other:
            assert (await other.request(type="history", session_id="s1"))["turns"] == []
        assert await c.request(type="clear_history", session_id="s1") == {"type": "history_cleared", "session_id": "s1"}
        assert (await c.request(type="history", session_id="s1"))["turns"] == []


async def test_same_request_id_in_same_session_starts_nothing_new(redis_url: str) -> None:
    async with gateway(redis_url) as gw, worker(redis_url), client(gw.port, "alice") as c:
        first = await c.chat("s1", max_tokens=5, request_id="once")
        again = await c.chat("s1", max_tokens=5, request_id="once")
        assert again == first
        await c.terminal(first)
        history = await c.request(type="history", session_id="s1")
        assert len([turn for turn in history["turns"] if turn["role"] == "user"]) == 1


async def test_healthz_metrics_and_demo_page(redis_url: str) -> None:
    async with gateway(redis_url) as gw, worker(redis_url), client(gw.port, "alice") as c:
        mid = await c.chat("s1", max_tokens=3)
        await c.terminal(mid)
        status, body = await http_get(gw.port, "/healthz")
        assert status == 200 and json.loads(body)["redis"] is True
        status, body = await http_get(gw.port, "/metrics")
        assert status == 200 and "tokenrelay_gateway_frames_out_total" in body
        status, body = await http_get(gw.port, "/")
        assert status == 200 and "<html" in body.lower()
        assert (await http_get(gw.port, "/nope"))[0] == 404


async def test_auth_with_secret_requires_a_valid_token(redis_url: str) -> None:
    secret = SECRET
    async with gateway(redis_url, auth_secret=secret) as gw, worker(redis_url):
        now = time.time()
        token = mint_token(secret, "carol", now, 600)
        async with client(gw.port) as c:
            reply = await c.request(type="auth", token=token)
            assert reply == {"type": "auth_ok", "user": "carol", "expires_at": int(now) + 600}
            mid = await c.chat("s1", max_tokens=2)
            assert (await c.terminal(mid))["type"] == "done"
        for first in ({"type": "heartbeat"}, {"type": "auth", "token": token + "x"}, {"type": "auth", "user": "mallory"}):
            async with client(gw.port) as c:
                await c.ws.send(json.dumps(first))
                with pytest.raises(ConnectionError):
                    await c.wait_for(lambda f: False, timeout=5)
                assert c.ws.close_code == 1008


async def test_auth_timeout_closes_with_1008(redis_url: str) -> None:
    async with gateway(redis_url, auth_secret=SECRET, auth_timeout_s=0.3) as gw, client(gw.port) as c:
        with pytest.raises(ConnectionError):
            await c.wait_for(lambda f: False, timeout=5)
        assert c.ws.close_code == 1008


def test_token_cli_mints_a_token_the_gateway_accepts() -> None:
    from protocol.auth import verify_token

    out = subprocess.run(
        [sys.executable, "-m", "gateway", "token", "--user", "alice", "--secret", SECRET],
        check=True, capture_output=True, text=True, timeout=t(30),
    ).stdout.strip()
    assert verify_token(SECRET, out, time.time()) == "alice"


async def test_closed_connection_raises_nothing_for_other_clients(redis_url: str) -> None:
    async with gateway(redis_url) as gw, worker(redis_url), client(gw.port, "alice") as a:
        async with client(gw.port, "alice") as b:
            await b.chat("s2", max_tokens=50)
        mid = await a.chat("s1", max_tokens=3)
        assert (await a.terminal(mid))["type"] == "done"
        with pytest.raises(ConnectionClosed):
            await b.ws.send("{}")


async def test_connection_that_misses_its_pings_is_closed_and_counted(redis_url: str) -> None:
    from gateway import metrics
    from tests.support import raw_client_that_never_reads, wait_until

    before = metrics.CLOSED.labels("ping_timeout")._value.get()
    async with gateway(redis_url, ping_interval_s=0.2, ping_timeout_s=0.2, close_timeout_s=0.2) as gw:
        sock = await raw_client_that_never_reads(gw.port)
        try:
            await wait_until(lambda: bool(gw.connections))
            await wait_until(lambda: not gw.connections)
        finally:
            sock.close()
    assert metrics.CLOSED.labels("ping_timeout")._value.get() == before + 1


async def test_token_without_a_configured_secret_is_refused_not_ignored(redis_url: str) -> None:
    async with gateway(redis_url) as gw, worker(redis_url), client(gw.port) as c:
        error = await c.request(type="auth", token="abc.def")
        assert error["type"] == "error" and error["code"] == "unauthorized" and "user" in error["message"]
        assert await c.request(type="auth", user="dave") == {"type": "auth_ok", "user": "dave"}
        mid = await c.chat("s", max_tokens=2)
        assert (await c.terminal(mid))["type"] == "done"
