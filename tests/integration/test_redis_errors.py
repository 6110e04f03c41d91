"""Errors Redis answers while it is up (OOM, READONLY, NOSCRIPT, a stalled server): no process
dies, every accepted message ends in exactly one terminal, nothing is lost or repeated.

Each test runs real gateway and worker processes on a Redis of its own and causes the errors
for real (CONFIG SET maxmemory, REPLICAOF, SCRIPT FLUSH, DEBUG SLEEP, CLIENT PAUSE, CLIENT KILL).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis

from store import keys
from tests.support import JOBS_STREAM, KEYSPACE, Client, ProcessCluster, assert_stream_ok, client, t, wait_until


@pytest.fixture
def cluster(own_redis: tuple[str, redis.Redis], tmp_path: Path) -> Iterator[ProcessCluster]:
    c = ProcessCluster(own_redis[0], tmp_path)
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
async def admin(own_redis: tuple[str, redis.Redis]) -> AsyncIterator[redis.Redis]:
    """The test's own Redis, put back to normal at the end whatever the test did to it."""
    r = own_redis[1]
    yield r
    take_writes(r)


async def serving(cluster: ProcessCluster, *worker_args: str) -> int:
    """One gateway and one synthetic worker (50 tokens/s); the gateway's port."""
    gw = cluster.add_gateway()
    cluster.add_worker("--engine", "synthetic", "--synthetic-rate", "50", *worker_args)
    await cluster.wait_healthy()
    assert gw.port is not None
    return gw.port


def logged(cluster: ProcessCluster, event: str) -> bool:
    """Some process of the cluster logged `event` (its JSON log lines name it in quotes)."""
    return any(f'"{event}"' in p.log_path.read_text() for p in cluster.procs)


def assert_all_alive(cluster: ProcessCluster) -> None:
    for proc in cluster.procs:
        assert proc.popen is not None and proc.popen.poll() is None, f"{proc.log_path.name} exited\n{cluster.logs()}"


async def streaming(c: Client, mid: str, min_seq: int = 3) -> None:
    await c.wait_for(lambda f: f["type"] == "chunk" and f["message_id"] == mid and f["seq"] >= min_seq)


async def still_serves(port: int) -> None:
    """A new chat, start to end, and a Stop of another one."""
    async with client(port, "bob") as b:
        mid = await b.chat("after", max_tokens=5)
        assert (await b.terminal(mid))["type"] == "done"
        assert_stream_ok(b, mid)
        long = await b.chat("after-2", max_tokens=1000)
        await streaming(b, long, 1)
        assert (await b.cancel(message_id=long))["status"] == "cancelling"
        assert (await b.terminal(long))["type"] == "cancelled"


def refuse_writes(admin: redis.Redis, how: str) -> None:
    """OOM: memory full under `noeviction`; READONLY: the server became a replica (of a master
    that does not answer), as after a failover."""
    if how == "OOM":
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", 1)
    else:
        admin.execute_command("REPLICAOF", "127.0.0.1", "1")


def take_writes(admin: redis.Redis) -> None:
    admin.config_set("maxmemory", 0)
    admin.execute_command("REPLICAOF", "NO", "ONE")


@pytest.mark.parametrize("how", ["OOM", "READONLY"])
async def test_writes_refused_mid_stream_the_stream_resumes_and_every_process_survives(
    cluster: ProcessCluster, admin: redis.Redis, how: str
) -> None:
    port = await serving(cluster)
    async with client(port, "alice") as a:
        mid = await a.chat("s", max_tokens=200)
        await streaming(a, mid)
        refuse_writes(admin, how)
        await wait_until(lambda: logged(cluster, "chunk_write_refused") and logged(cluster, "beat_failed"))
        refused = await a.request(type="chat", session_id="s2", text="while refused")
        assert refused["type"] == "error" and refused["code"] == "unavailable", refused
        take_writes(admin)
        end = await a.terminal(mid, timeout=30)
        assert end == {"type": "done", "message_id": mid, "seq": len(a.chunks(mid)), "finish_reason": "length"}
        assert_stream_ok(a, mid)
        assert len(a.text(mid).split()) == 200, "every token, once, in order"
    assert_all_alive(cluster)
    await still_serves(port)


async def test_writes_refused_past_the_deadline_end_the_message_unavailable(
    cluster: ProcessCluster, admin: redis.Redis
) -> None:
    port = await serving(cluster, "--redis-deadline", "2")
    async with client(port, "alice") as a:
        mid = await a.chat("s", max_tokens=1000)
        await streaming(a, mid)
        refuse_writes(admin, "OOM")
        await wait_until(lambda: logged(cluster, "chunk_write_failed"), timeout=15)
        take_writes(admin)
        end = await a.terminal(mid, timeout=30)
        assert end["type"] == "error" and end["code"] == "unavailable", end
        assert_stream_ok(a, mid)
        assert [e["type"] for e in a.events(mid)].count("error") == 1
        history = await a.request(type="history", session_id="s")
        assert history["turns"][-1] == {"message_id": mid, "role": "assistant", "text": a.text(mid), "status": "error"}
    assert_all_alive(cluster)
    await still_serves(port)


async def test_scripts_flushed_mid_stream_are_loaded_again(cluster: ProcessCluster, admin: redis.Redis) -> None:
    port = await serving(cluster)
    async with client(port, "alice") as a:
        mid = await a.chat("s", max_tokens=100)
        await streaming(a, mid)
        admin.script_flush()
        end = await a.terminal(mid, timeout=30)
        assert end["type"] == "done"
        assert_stream_ok(a, mid)
        assert len(a.text(mid).split()) == 100
        admin.script_flush()
        await still_serves(port)
    assert_all_alive(cluster)


@pytest.mark.parametrize("stall", ["DEBUG SLEEP", "CLIENT PAUSE"])
async def test_a_stalled_redis_times_out_and_the_stream_goes_on(
    cluster: ProcessCluster, admin: redis.Redis, stall: str
) -> None:
    """Redis stops answering for 3 s: every client's call times out (2 s), then retries."""
    port = await serving(cluster)
    async with client(port, "alice") as a:
        mid = await a.chat("s", max_tokens=300)
        await streaming(a, mid)
        if stall == "DEBUG SLEEP":
            stalled = asyncio.create_task(asyncio.to_thread(admin.execute_command, "DEBUG", "SLEEP", "3"))
        else:
            admin.execute_command("CLIENT", "PAUSE", "3000", "ALL")
            stalled = asyncio.create_task(asyncio.sleep(0))
        end = await a.terminal(mid, timeout=40)
        await stalled
        assert end["type"] == "done", end
        assert_stream_ok(a, mid)
        assert len(a.text(mid).split()) == 300
    assert_all_alive(cluster)
    await still_serves(port)


async def test_connections_killed_every_task_reconnects(cluster: ProcessCluster, admin: redis.Redis) -> None:
    """CLIENT KILL of every connection (pub/sub ones too) while a message streams."""
    port = await serving(cluster)
    async with client(port, "alice") as a:
        mid = await a.chat("s", max_tokens=200)
        await streaming(a, mid)
        for kind in ("pubsub", "normal"):
            admin.client_kill_filter(_type=kind, skipme=True)
        end = await a.terminal(mid, timeout=30)
        assert end["type"] == "done"
        assert_stream_ok(a, mid)
        assert len(a.text(mid).split()) == 200
    assert_all_alive(cluster)
    await still_serves(port)


async def test_job_stream_entries_name_the_message_and_the_prompt_leaves_with_it(
    cluster: ProcessCluster, admin: redis.Redis
) -> None:
    port = await serving(cluster)
    text = "x" * 15_000
    async with client(port, "alice") as a:
        mid = await a.chat("s", text=text, max_tokens=3)
        await a.terminal(mid)
    ((_entry_id, fields),) = admin.xrange(JOBS_STREAM)
    assert fields == {b"m": mid.encode()}
    assert not admin.hexists(keys.meta(mid), "job"), "the ended message still holds its prompt"
    turn = json.loads(admin.lrange(KEYSPACE.history("alice", "s"), 0, -1)[0])
    assert turn["text"] == text, "the user's turn is kept in history"
