"""Resume on any gateway, orphans, admission control and slow clients (in-process parts)."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import pytest

from gateway.server import Gateway
from store.settings import Lifetimes
from tests.support import (
    TERMINALS,
    assert_stream_ok,
    client,
    gateway,
    close_code_in,
    masked_text_frame,
    message_id,
    raw_client_that_never_reads,
    read_until_eof,
    t,
    wait_until,
    worker,
)
from tests.cluster import RedisTarget
from worker.engines.synthetic import SyntheticEngine


def slow(rate: float = 50.0, n: int = 20) -> list[SyntheticEngine]:
    return [SyntheticEngine(rate=rate)] * n


async def test_resume_mid_stream_on_another_gateway_is_seamless(redis_target: RedisTarget) -> None:
    url, topology = redis_target.url, await redis_target.topology()
    async with gateway(url, topology=topology) as g1, gateway(url, topology=topology) as g2, worker(url, slow(100.0), topology=topology):
        async with client(g1.port, "alice") as a:
            mid = await a.chat("s", max_tokens=120)
            await a.wait_for(lambda f: f["type"] == "chunk" and f["seq"] >= 10)
        held = a.chunks(mid)
        last = held[-1]["seq"]
        async with client(g2.port, "alice") as b:
            await b.send(type="resume", message_id=mid, after_seq=last)
            end = await b.terminal(mid)
            assert end["type"] == "done"
            assert_stream_ok(b, mid, after_seq=last)
            words = (a.text(mid) + b.text(mid)).split()
        assert len(words) == 120


async def test_resume_after_the_end_replays_everything_after_the_seq(redis_target: RedisTarget) -> None:
    url, topology = redis_target.url, await redis_target.topology()
    async with gateway(url, topology=topology) as g1, gateway(url, topology=topology) as g2, worker(url, topology=topology):
        async with client(g1.port, "alice") as a:
            mid = await a.chat("s", max_tokens=15)
            await a.terminal(mid)
        last = a.events(mid)[-1]["seq"]
        assert last >= 2
        async with client(g2.port, "alice") as b:
            for after in (0, last // 2, last):
                start = len(b.frames)
                await b.send(type="resume", message_id=mid, after_seq=after)
                end = await b.wait_for(lambda f: f["type"] in TERMINALS, start=start)
                replay = [f for f in b.frames[start:] if f.get("message_id") == mid]
                assert [f["seq"] for f in replay if f["type"] == "chunk"] == list(range(after + 1, last + 1))
                assert replay[-1] == end == a.events(mid)[-1]


async def test_resume_unknown_or_foreign_message_is_not_found(redis_target: RedisTarget) -> None:
    url, topology = redis_target.url, await redis_target.topology()
    async with gateway(url, topology=topology) as gw, worker(url, topology=topology), client(gw.port, "alice") as a:
        mid = await a.chat("s", max_tokens=3)
        await a.terminal(mid)
        async with client(gw.port, "bob") as b:
            for target in (mid, "m-unknown", message_id("bob")):
                start = len(b.frames)
                await b.send(type="resume", message_id=target, after_seq=0)
                error = await b.wait_for(lambda f: f["type"] == "error", start=start)
                assert error["code"] == "not_found" and error["message_id"] == target
            assert (await b.request(type="heartbeat"))["type"] == "heartbeat_ack"


async def test_orphaned_generation_is_cancelled_after_the_detach_grace(redis_target: RedisTarget) -> None:
    url, topology = redis_target.url, await redis_target.topology()
    lifetimes = Lifetimes(detach_grace_s=0.5)
    async with gateway(url, topology=topology, lifetimes=lifetimes) as gw, worker(
        url, slow(50.0), orphan_check_s=0.1, topology=topology
    ) as w:
        async with client(gw.port, "alice") as a:
            mid = await a.chat("s", max_tokens=2000)
            await a.wait_for(lambda f: f["type"] == "chunk")
        closed_at = time.monotonic()
        async with client(gw.port, "alice") as b:
            turns: list[dict[str, Any]] = []

            async def cancelled_in_history() -> bool:
                turns[:] = (await b.request(type="history", session_id="s"))["turns"]
                return bool(turns[-1]["status"] == "cancelled")

            await wait_until(cancelled_in_history)
        waited = time.monotonic() - closed_at
        assert 0.4 <= waited < t(5), waited
        assert turns[-1]["message_id"] == mid
        assert turns[-1]["text"], "the partial answer is kept"
        # The orphan check ends the message in the store first; the job then sees its cancel
        # and unwinds (a few ms later, more on a busy machine).
        await wait_until(lambda: not w.running, timeout=5)


async def test_a_resumed_generation_is_not_orphaned(redis_target: RedisTarget) -> None:
    url, topology = redis_target.url, await redis_target.topology()
    lifetimes = Lifetimes(detach_grace_s=0.5)
    async with gateway(url, topology=topology, lifetimes=lifetimes) as gw, worker(url, slow(50.0), topology=topology, orphan_check_s=0.1):
        async with client(gw.port, "alice") as a:
            mid = await a.chat("s", max_tokens=150)
            await a.wait_for(lambda f: f["type"] == "chunk")
        last = a.chunks(mid)[-1]["seq"]
        async with client(gw.port, "alice") as b:
            await b.send(type="resume", message_id=mid, after_seq=last)
            end = await b.terminal(mid)
            assert end["type"] == "done", end
            assert_stream_ok(b, mid, after_seq=last)


async def test_backlog_over_the_limit_answers_overloaded(redis_url: str) -> None:
    lifetimes = Lifetimes(backlog_limit=2)
    async with gateway(redis_url, lifetimes=lifetimes) as gw, client(gw.port, "alice") as a:
        await a.chat("s1")
        await a.chat("s2")
        error = await a.request(type="chat", session_id="s3", text="x", request_id="r3")
        assert error == {"type": "error", "code": "overloaded", "message": error["message"], "request_id": "r3"}
        async with worker(redis_url):
            async def accepted_again() -> bool:
                return bool((await a.request(type="chat", session_id="s4", text="y"))["type"] == "accepted")

            await wait_until(accepted_again)


async def test_client_that_never_reads_is_closed_4008_and_others_keep_streaming(redis_url: str) -> None:
    async with gateway(
        redis_url, slow_client_timeout_s=1.0, write_limit_bytes=4096, send_buffer_bytes=4096
    ) as gw, worker(redis_url, slow(0.0, 60)):
        sock = await raw_client_that_never_reads(gw.port)
        try:
            await flood_and_check(gw, sock)
        finally:
            sock.close()
        from gateway import metrics

        assert metrics.CLOSED.labels("slow_consumer")._value.get() >= 1


async def flood_and_check(gw: Gateway, sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    for n in range(40):
        chat = f'{{"type":"chat","session_id":"s{n}","text":"x","max_tokens":2048}}'.encode()
        await loop.sock_sendall(sock, masked_text_frame(chat))
    async with client(gw.port, "bob") as bob:
        mid = await bob.chat("b", max_tokens=200)
        assert (await bob.terminal(mid))["type"] == "done"
        assert_stream_ok(bob, mid)
        await wait_until(lambda: any(conn.channel.closed_slow for conn in gw.connections), timeout=20)
    assert close_code_in(await read_until_eof(sock)) == 4008


@pytest.mark.parametrize("text", ["x" * 20])
async def test_redis_unreachable_chat_answers_unavailable_and_heartbeats_continue(redis_url: str, text: str) -> None:
    from store.embedded import free_port

    dead = f"redis://127.0.0.1:{free_port()}/0"
    async with gateway(dead) as gw, client(gw.port, "alice") as a:
        started = time.monotonic()
        error = await a.request(type="chat", session_id="s", text=text, request_id="r")
        assert error["type"] == "error" and error["code"] == "unavailable" and error["request_id"] == "r"
        assert time.monotonic() - started < t(3)
        assert (await a.request(type="heartbeat", ts=1.0))["type"] == "heartbeat_ack"
        assert (await a.request(type="cancel", message_id=message_id("alice")))["code"] == "unavailable"


async def test_scripts_flushed_mid_stream_the_stream_continues(redis_url: str) -> None:
    import redis.asyncio as aioredis

    async with gateway(redis_url) as gw, worker(redis_url, slow(100.0)), client(gw.port, "alice") as a:
        mid = await a.chat("s", max_tokens=100)
        await a.wait_for(lambda f: f["type"] == "chunk" and f["seq"] >= 5)
        admin = aioredis.Redis.from_url(redis_url)
        try:
            await admin.script_flush()
        finally:
            await admin.aclose()
        assert (await a.terminal(mid))["type"] == "done"
        assert_stream_ok(a, mid)
        assert len(a.text(mid).split()) == 100
