"""A cancel that finds nothing of its connection ahead of it has its script written from the
frame's callback (`gateway.early`); one that finds anything ahead of it waits its turn, and
what follows an early cancel is answered after it."""

from __future__ import annotations

import asyncio
import json
import socket

import pytest

from gateway import metrics
from tests.support import (
    assert_stream_ok,
    client,
    close_code_in,
    gateway,
    masked_text_frame,
    raw_websocket,
    read_until_eof,
    server_frames,
    t,
    worker,
)
from worker.engines.synthetic import SyntheticEngine


def early_cancels() -> float:
    return float(metrics.EARLY_CANCELS._value.get())


def frame(**message: object) -> bytes:
    return masked_text_frame(json.dumps(message).encode())


async def replies(sock: socket.socket, count: int) -> list[dict[str, object]]:
    """The next `count` text frames from the server, decoded."""
    loop = asyncio.get_running_loop()
    data = b""
    async with asyncio.timeout(t(10)):
        while len(texts := [p for op, p in server_frames(data) if op == 0x1]) < count:
            chunk = await loop.sock_recv(sock, 65536)
            assert chunk, "the server closed the connection"
            data += chunk
    return [json.loads(text) for text in texts]


async def authenticated(port: int, user: str) -> socket.socket:
    """A raw client, authenticated, after one request that opened the store's lean connection
    (the early path needs it open)."""
    sock = await raw_websocket(port)
    for message, reply in ((frame(type="auth", user=user), "auth_ok"), (frame(type="history", session_id="s0"), "history")):
        await asyncio.get_running_loop().sock_sendall(sock, message)
        assert (await replies(sock, 1))[0]["type"] == reply
    return sock


async def test_a_cancel_on_an_idle_connection_is_taken_early_and_answered_before_its_terminal(
    redis_url: str,
) -> None:
    async with gateway(redis_url) as gw, worker(redis_url, [SyntheticEngine(rate=20.0)]), client(gw.port, "al") as c:
        mid = await c.chat("s1", max_tokens=1000)
        await c.wait_for(lambda f: f["type"] == "chunk" and f["message_id"] == mid)
        before = early_cancels()
        assert (await c.cancel(message_id=mid))["status"] == "cancelling"
        assert (await c.terminal(mid))["type"] == "cancelled"
        assert early_cancels() == before + 1
        ends = [f["type"] for f in c.frames if f["type"] in ("cancel_result", "cancelled")]
        assert ends == ["cancel_result", "cancelled"]
        assert_stream_ok(c, mid)
        assert (await c.cancel(message_id=mid))["status"] == "already_cancelled"


@pytest.mark.parametrize(
    ("first", "early"),
    [("history", 0), ("cancel", 1)],
    ids=["a cancel behind a request keeps its turn", "a request behind an early cancel comes after it"],
)
async def test_two_requests_in_one_write_are_answered_in_order(redis_url: str, first: str, early: int) -> None:
    """Both frames arrive in one read: a cancel that finds the request ahead of it takes the
    usual path (without the check of websockets' queue it overtook it), and a request that
    follows an early cancel queues behind it."""
    requests = {"history": frame(type="history", session_id="s1"), "cancel": frame(type="cancel", message_id="m-nope")}
    order = [first, *(kind for kind in requests if kind != first)]
    async with gateway(redis_url) as gw:
        sock = await authenticated(gw.port, "bo")
        try:
            before = early_cancels()
            await asyncio.get_running_loop().sock_sendall(sock, b"".join(requests[kind] for kind in order))
            answers = await replies(sock, 2)
            assert [a["type"] for a in answers] == [{"cancel": "cancel_result"}.get(kind, kind) for kind in order]
            assert early_cancels() == before + early
        finally:
            sock.close()


async def test_malformed_cancels_take_the_usual_path(redis_url: str) -> None:
    async with gateway(redis_url) as gw:
        sock = await raw_websocket(gw.port)
        try:
            loop = asyncio.get_running_loop()
            await loop.sock_sendall(sock, frame(type="auth", user="di"))
            before = early_cancels()
            await loop.sock_sendall(sock, frame(type="cancel", message_id=5))
            answers = await replies(sock, 2)
            assert answers[1]["type"] == "error" and answers[1]["code"] == "bad_request"
            await loop.sock_sendall(sock, masked_text_frame(b'{"type":"cancel","message_id":"\xff"}'))
            assert close_code_in(await read_until_eof(sock)) == 1007  # invalid UTF-8, as before
            assert early_cancels() == before
        finally:
            sock.close()
