"""The lean pipelined command connection (`store.lean`) against real Redis servers."""

from __future__ import annotations

import asyncio

import hiredis
import pytest
import redis as sync_redis
import redis.exceptions
from redis.connection import parse_url

from store import embedded
from store.lean import LeanClient
from tests.support import t


def lean(url: str, timeout_s: float = 2.0) -> LeanClient:
    return LeanClient(parse_url(url), timeout_s=timeout_s)  # type: ignore[no-untyped-call]


async def test_a_batch_answers_in_order_with_errors_as_values(redis_url: str) -> None:
    client = lean(redis_url)
    try:
        replies = await client.execute(
            [("SET", "lean:s", "text"), ("INCR", "lean:s"), ("GET", "lean:s"), ("GET", "lean:missing")]
        )
        with pytest.raises(redis.exceptions.ResponseError, match="not an integer"):
            await client.call("INCR", "lean:s")
        with pytest.raises(redis.exceptions.NoScriptError):
            await client.call("EVALSHA", "0" * 40, 0)
        assert await client.call("GET", "lean:s") == b"text"
    finally:
        await client.close()
    assert replies[0] == b"OK"
    assert isinstance(replies[1], hiredis.ReplyError) and "not an integer" in str(replies[1])
    assert replies[2:] == [b"text", None]


async def test_concurrent_batches_each_get_their_own_replies(redis_url: str) -> None:
    client = lean(redis_url)
    try:
        results = await asyncio.gather(
            *(client.execute([("INCR", "lean:n"), ("ECHO", f"batch {i}")]) for i in range(200))
        )
    finally:
        await client.close()
    assert [echo for _n, echo in results] == [f"batch {i}".encode() for i in range(200)]
    assert sorted(n for n, _echo in results) == list(range(1, 201))


async def test_database_and_password_from_the_url(own_redis: tuple[str, sync_redis.Redis]) -> None:
    url, admin = own_redis
    admin.config_set("requirepass", "s3cret")
    port = url.rsplit(":", 1)[1].split("/")[0]
    good = lean(f"redis://:s3cret@127.0.0.1:{port}/3")
    try:
        assert await good.execute([("SET", "lean:db", "3")]) == [b"OK"]
    finally:
        await good.close()
    checker = sync_redis.Redis(port=int(port), db=3, password="s3cret")
    try:
        assert checker.get("lean:db") == b"3"
    finally:
        checker.close()
    bad = lean(f"redis://:wrong@127.0.0.1:{port}/0")
    with pytest.raises(redis.exceptions.ConnectionError, match="refused"):
        await bad.execute([("PING",)])
    await bad.close()


async def test_reconnects_after_the_server_drops_the_connection(redis_url: str) -> None:
    client = lean(redis_url)
    admin = sync_redis.Redis.from_url(redis_url)
    try:
        (first_id,) = await client.execute([("CLIENT", "ID")])
        assert admin.client_kill_filter(_id=first_id) == 1
        async with asyncio.timeout(t(5)):
            while True:
                try:
                    (second_id,) = await client.execute([("CLIENT", "ID")])
                    break
                except redis.exceptions.ConnectionError:
                    continue  # the batch that met the dropped connection fails; the next reconnects
        assert second_id != first_id
    finally:
        admin.close()
        await client.close()


async def test_a_silent_server_times_out_and_the_next_call_works(own_redis: tuple[str, sync_redis.Redis]) -> None:
    url, admin = own_redis
    client = lean(url, timeout_s=0.2)
    try:
        assert await client.execute([("PING",)]) == [b"PONG"]
        admin.execute_command("CLIENT", "PAUSE", 1000, "ALL")
        with pytest.raises(redis.exceptions.TimeoutError):
            await client.execute([("PING",)])
        async with asyncio.timeout(t(5)):
            while True:
                try:
                    assert await client.execute([("PING",)]) == [b"PONG"]
                    break
                except redis.exceptions.RedisError:
                    continue
    finally:
        await client.close()


async def test_nothing_listening_is_a_connection_error() -> None:
    client = lean(f"redis://127.0.0.1:{embedded.free_port()}/0")
    with pytest.raises(redis.exceptions.ConnectionError):
        await client.execute([("PING",)])
