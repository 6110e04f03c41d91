"""A replay (a `resume`, or any re-read of a message's log) delivers every chunk and then the
real terminal, whatever happens while it runs: a client that reads slowly (the relay's inbox
overflows; it hears nothing for seconds), the gateway's pub/sub connection killed. Only a log
that was really trimmed ends the stream early, with `not_found` at the last seq delivered;
Redis refusing the relay's reads for a while (BUSY behind a slow script) only delays it.

The slow reader is a real WebSocket client with a small receive buffer that stops reading
until the event under test has happened at the gateway (seen on its /metrics).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import redis
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from protocol.validation import Limits
from store import keys
from store.settings import Lifetimes
from store.redis_store import LOG_PAGE
from tests.support import Client, assert_stream_ok, client, gateway, http_get, wait_until, worker
from worker.engines.synthetic import SyntheticEngine

SLOW_CLIENT = {"send_buffer_bytes": 4096, "write_limit_bytes": 4096, "limits": Limits(max_tokens=10_000)}
"""Gateway settings that make a client that stops reading block the relay within a few KB."""


def engines(rate: float) -> list[SyntheticEngine]:
    return [SyntheticEngine(rate=rate)] * 2


async def metric(port: int, name: str, **labels: str) -> float:
    """The value of one sample on the gateway's /metrics (0 when absent)."""
    status, body = await http_get(port, "/metrics")
    assert status == 200
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


async def resyncs(port: int, cause: str) -> float:
    return await metric(port, "tokenrelay_gateway_log_resyncs_total", cause=cause)


async def frames_out(port: int) -> float:
    return await metric(port, "tokenrelay_gateway_frames_out_total")


@contextlib.asynccontextmanager
async def slow_reader(port: int, user: str) -> AsyncIterator[Client]:
    """An authenticated client with a 4 KB receive buffer that has stopped reading."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    async with client(port, user, sock=sock, max_queue=4) as c:
        c.pause_reading()
        yield c


async def finished_message(c: Client, chunks: int) -> str:
    mid = await c.chat("s", max_tokens=chunks)
    end = await c.terminal(mid, timeout=60)
    assert end["type"] == "done" and len(c.chunks(mid)) == chunks
    return mid


async def replay_under_way(port: int, since: float) -> None:
    """The gateway has sent at least 100 frames more than `since`: a replay has read its
    first page and is now held up by the client."""
    async def sent() -> bool:
        return await frames_out(port) >= since + 100

    await wait_until(sent, timeout=20)


async def held_replay(
    port: int, b: Client, mid: str, cause: str, act: Callable[[], Awaitable[object]] | None = None
) -> None:
    """`b`, not reading, resumes `mid` from its start; once the replay is under way `act`
    runs (when given); `b` starts reading once the gateway has counted a resync of `cause`,
    which therefore came while the replay was held up."""
    before, sent = await resyncs(port, cause), await frames_out(port)
    await b.send(type="resume", message_id=mid, after_seq=0)
    if act is not None:
        await replay_under_way(port, sent)
        await act()

    async def happened() -> bool:
        return await resyncs(port, cause) > before

    await wait_until(happened, timeout=20)
    b.resume_reading()


def assert_everything_then_done(c: Client, mid: str, chunks: int) -> None:
    end = assert_stream_ok(c, mid)
    assert end["type"] == "done", end
    assert len(c.chunks(mid)) == chunks


async def test_a_replay_reads_a_10000_chunk_log_in_pages(redis_url: str) -> None:
    admin = aioredis.Redis.from_url(redis_url)
    try:
        async with gateway(redis_url, limits=Limits(max_tokens=10_000)) as gw, worker(
            redis_url, engines(0.0), coalesce_window_s=0.0
        ):
            async with client(gw.port, "alice") as a:
                mid = await finished_message(a, 10_000)
            before = (await admin.info("commandstats"))["cmdstat_xrange"]["calls"]
            async with client(gw.port, "alice") as b:
                await b.send(type="resume", message_id=mid, after_seq=0)
                await b.terminal(mid, timeout=60)
                assert_everything_then_done(b, mid, 10_000)
            reads = (await admin.info("commandstats"))["cmdstat_xrange"]["calls"] - before
    finally:
        await admin.aclose()
    assert reads >= -(-10_001 // LOG_PAGE), reads  # 10,000 chunks and the terminal


async def test_inbox_overflow_behind_a_slow_reader_during_a_replay(redis_url: str) -> None:
    async with gateway(redis_url, **SLOW_CLIENT) as gw, worker(redis_url, engines(500.0), coalesce_window_s=0.0):
        async with client(gw.port, "alice") as a, slow_reader(gw.port, "alice") as b:
            mid = await a.chat("s", max_tokens=4000)
            await a.wait_for(lambda f: f["type"] == "chunk" and f["seq"] >= 1500, timeout=30)
            await held_replay(gw.port, b, mid, "overflow")
            await b.terminal(mid, timeout=60)
            assert_everything_then_done(b, mid, 4000)


async def test_a_reader_silent_for_seconds_during_a_replay(redis_url: str) -> None:
    """Nothing is pushed for a finished message: the idle sweep asks the held-up relay to
    re-read its log."""
    async with gateway(redis_url, **SLOW_CLIENT) as gw, worker(redis_url, engines(0.0), coalesce_window_s=0.0):
        async with client(gw.port, "alice") as a:
            mid = await finished_message(a, 3000)
        async with slow_reader(gw.port, "alice") as b:
            await held_replay(gw.port, b, mid, "idle")
            await b.terminal(mid, timeout=60)
            assert_everything_then_done(b, mid, 3000)


async def test_pubsub_reconnect_during_a_replay(redis_url: str) -> None:
    admin = aioredis.Redis.from_url(redis_url)
    try:
        async with gateway(redis_url, **SLOW_CLIENT) as gw, worker(redis_url, engines(300.0), coalesce_window_s=0.0):
            async with client(gw.port, "alice") as a, slow_reader(gw.port, "alice") as b:
                mid = await a.chat("s", max_tokens=3000)
                await a.wait_for(lambda f: f["type"] == "chunk" and f["seq"] >= 1000, timeout=30)
                await held_replay(gw.port, b, mid, "reconnect", lambda: admin.client_kill_filter(_type="pubsub"))
                await b.terminal(mid, timeout=60)
                assert_everything_then_done(b, mid, 3000)
                await a.terminal(mid, timeout=60)
                assert_everything_then_done(a, mid, 3000)
    finally:
        await admin.aclose()


async def test_a_trimmed_log_ends_the_resume_with_not_found(redis_url: str) -> None:
    admin = aioredis.Redis.from_url(redis_url)
    try:
        async with gateway(redis_url) as gw, worker(redis_url, engines(0.0), coalesce_window_s=0.0):
            async with client(gw.port, "alice") as a:
                mid = await finished_message(a, 50)
            await admin.xtrim(keys.log(mid), maxlen=10, approximate=False)  # positions 42..51 stay
            async with client(gw.port, "alice") as b:
                await b.send(type="resume", message_id=mid, after_seq=0)
                end = await b.terminal(mid)
                assert end["type"] == "error" and end["code"] == "not_found" and end["seq"] == 0, end
                assert "no longer kept" in end["message"]
                assert b.chunks(mid) == []
            async with client(gw.port, "alice") as c:
                await c.send(type="resume", message_id=mid, after_seq=41)
                assert (await c.terminal(mid))["type"] == "done"
                assert_stream_ok(c, mid, after_seq=41)
                assert len(c.chunks(mid)) == 9
    finally:
        await admin.aclose()


async def test_a_log_trimmed_during_a_replay_ends_where_the_kept_part_stops(redis_url: str) -> None:
    admin = aioredis.Redis.from_url(redis_url)
    try:
        async with gateway(redis_url, **SLOW_CLIENT) as gw, worker(redis_url, engines(0.0), coalesce_window_s=0.0):
            async with client(gw.port, "alice") as a:
                mid = await finished_message(a, 3000)
            async with slow_reader(gw.port, "alice") as b:
                sent = await frames_out(gw.port)
                await b.send(type="resume", message_id=mid, after_seq=0)
                await replay_under_way(gw.port, sent)
                await admin.xtrim(keys.log(mid), maxlen=1000, approximate=False)  # positions 2002..3001 stay
                b.resume_reading()
                end = await b.terminal(mid, timeout=60)
        assert end["type"] == "error" and end["code"] == "not_found", end
        seqs = [c["seq"] for c in b.chunks(mid)]
        assert seqs == list(range(1, len(seqs) + 1))
        assert end["seq"] == seqs[-1]
        assert seqs[-1] % LOG_PAGE == 0 and seqs[-1] < 2001, "the error comes where the page read before the trim ends"
    finally:
        await admin.aclose()


BUSY_SCRIPT = """
local t0 = redis.call('TIME')
while true do
  local t = redis.call('TIME')
  if (t[1] - t0[1]) * 1000000 + (t[2] - t0[2]) > tonumber(ARGV[1]) * 1000 then return 1 end
end
"""
"""A read-only script that keeps Redis busy for ARGV[1] ms: past `lua-time-limit` every other
client is answered BUSY."""


async def test_redis_answering_busy_during_a_replay(own_redis: tuple[str, redis.Redis]) -> None:
    """The gateway's own background writes are spaced out (beat, attach leases) so that
    only the relay meets the BUSY window."""
    url, admin = own_redis
    quiet = Lifetimes(instance_ttl_s=3_600, detach_grace_s=600)
    async with gateway(url, lifetimes=quiet, **SLOW_CLIENT) as gw:
        async with worker(url, engines(0.0), coalesce_window_s=0.0), client(gw.port, "alice") as a:
            mid = await finished_message(a, 3000)
        async with slow_reader(gw.port, "alice") as b:
            sent = await frames_out(gw.port)
            await b.send(type="resume", message_id=mid, after_seq=0)
            await replay_under_way(gw.port, sent)
            admin.config_set("lua-time-limit", 50)
            busy = asyncio.create_task(asyncio.to_thread(redis.Redis.from_url(url).eval, BUSY_SCRIPT, 0, 2000))

            def answering_busy() -> bool:
                try:
                    admin.get("probe")
                except redis.exceptions.ResponseError as exc:
                    return str(exc).startswith("BUSY")
                return False

            await wait_until(answering_busy, timeout=10)
            b.resume_reading()
            assert await busy == 1
            await b.terminal(mid, timeout=30)
            assert_everything_then_done(b, mid, 3000)
