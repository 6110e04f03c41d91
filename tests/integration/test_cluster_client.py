"""The lean cluster client (`store.cluster.ClusterClient`) against a real Redis Cluster."""

from __future__ import annotations

import asyncio
import hashlib

import hiredis
import pytest
import redis as sync_redis
import redis.exceptions
from redis.connection import parse_url
from redis.crc import key_slot

from store.cluster import ClusterClient, command_slot, lean_client
from store.embedded import ClusterNode, EmbeddedCluster
from tests.cluster import RedisTarget, fail_over, finish_migration, move_keys, other_master, restore, start_migration
from tests.support import t, wait_until

SCRIPT = "redis.call('RPUSH', KEYS[1], ARGV[1]) return redis.call('LLEN', KEYS[2])"
"""Two keys of one hash tag, like the product's per-message scripts."""


def cluster_client(url: str, timeout_s: float = 2.0) -> ClusterClient:
    return ClusterClient(parse_url(url), timeout_s=timeout_s)  # type: ignore[no-untyped-call]


def tag_in_slot(slot: int, prefix: str = "m") -> str:
    """A hash tag whose keys land in `slot`."""
    i = 0
    while key_slot(f"{prefix}{i}".encode()) != slot:
        i += 1
    return f"{prefix}{i}"


def test_command_slot_finds_the_key_of_each_kind_of_command() -> None:
    assert command_slot(("GET", "tr:{p3}:msg:x")) == key_slot(b"p3")
    assert command_slot((b"evalsha", "0" * 40, 2, "{p3}:a", "{p4}:b", "arg")) == key_slot(b"p3")
    assert command_slot(("EVALSHA", "0" * 40, 0, "arg")) is None
    assert command_slot(("SPUBLISH", "tr:{p5}:live:x", "data")) == key_slot(b"p5")
    assert command_slot(("PUBLISH", "tr:{p5}:live:x", "data")) == key_slot(b"p5")
    assert command_slot(("XREADGROUP", "GROUP", "g", "c", "COUNT", 1, "STREAMS", "{p6}:jobs", ">")) == key_slot(b"p6")
    assert command_slot(("XINFO", "STREAM", "{p7}:jobs")) == key_slot(b"p7")
    assert command_slot(("PING",)) is None


async def test_the_same_batch_answers_alike_on_one_redis_and_on_the_cluster(redis_target: RedisTarget) -> None:
    client = lean_client(parse_url(redis_target.url), cluster=redis_target.cluster)  # type: ignore[no-untyped-call]
    assert isinstance(client, ClusterClient) is redis_target.cluster
    try:
        replies = await client.execute(
            [("RPUSH", f"{{m{n % 7}}}:log", n) for n in range(70)] + [("LRANGE", f"{{m{i}}}:log", 0, -1) for i in range(7)]
        )
        with pytest.raises(redis.exceptions.ResponseError, match="WRONGTYPE"):
            await client.call("GET", "{m0}:log")
    finally:
        await client.close()
    assert replies[:70] == [n // 7 + 1 for n in range(70)]
    assert replies[70:] == [[str(n).encode() for n in range(i, 70, 7)] for i in range(7)]


async def test_a_batch_across_masters_answers_in_order_with_errors_as_values(redis_cluster: EmbeddedCluster, cluster_url: str) -> None:
    client = cluster_client(cluster_url)
    keys = [f"{{k{i}}}:v" for i in range(60)]
    try:
        replies = await client.execute(
            [("SET", key, f"value {i}") for i, key in enumerate(keys)]
            + [("INCR", keys[0]), ("GET", "{missing}"), ("PING",)]
            + [("GET", key) for key in keys]
        )
        with pytest.raises(redis.exceptions.ResponseError, match="not an integer"):
            await client.call("INCR", keys[1])
        with pytest.raises(redis.exceptions.NoScriptError):
            await client.call("EVALSHA", "0" * 40, 1, keys[1])
        masters = client.masters()
    finally:
        await client.close()
    assert replies[:60] == [b"OK"] * 60
    assert isinstance(replies[60], hiredis.ReplyError) and "not an integer" in str(replies[60])
    assert replies[61:63] == [None, b"PONG"]
    assert replies[63:] == [f"value {i}".encode() for i in range(60)]
    assert sorted(port for _host, port in masters) == sorted(m.port for m in redis_cluster.masters())
    owners = {key: redis_cluster.owner(key_slot(key.encode())) for key in keys}
    assert len({owner.port for owner in owners.values()}) == 3, "the batch spans every master"
    for key, owner in owners.items():  # a master answers MOVED for a key it does not serve
        with owner.client() as direct:
            assert direct.exists(key) == 1


async def test_evalsha_goes_to_the_slot_of_its_first_key(cluster_url: str) -> None:
    admin = sync_redis.RedisCluster.from_url(cluster_url)
    sha = hashlib.sha1(SCRIPT.encode()).hexdigest()
    admin.script_load(SCRIPT)  # redis-py loads it on every master
    admin.close()
    client = cluster_client(cluster_url)
    try:
        replies = await client.execute(
            [("EVALSHA", sha, 2, f"{{m{i}}}:log", f"{{m{i}}}:log", "x") for i in range(50)]
        )
    finally:
        await client.close()
    assert replies == [1] * 50


async def test_a_keyless_command_goes_with_the_command_before_it(redis_cluster: EmbeddedCluster, cluster_url: str) -> None:
    """So WAIT after a write waits for that write's master. CLUSTER MYID names the node."""
    keys = [f"{{w{i}}}:k" for i in range(12)]
    client = cluster_client(cluster_url)
    try:
        replies = await client.execute([c for key in keys for c in (("SET", key, 1), ("CLUSTER", "MYID"))])
    finally:
        await client.close()
    owners = [redis_cluster.owner(key_slot(key.encode())) for key in keys]
    assert len({owner.port for owner in owners}) == 3
    assert replies[1::2] == [owner.node_id.encode() for owner in owners]


async def test_per_slot_order_is_kept_in_a_batch_across_masters(cluster_url: str) -> None:
    """512 appends to 40 messages spread over every master: each message's list is in order."""
    client = cluster_client(cluster_url)
    messages = [f"{{msg{i}}}:log" for i in range(40)]
    try:
        await client.execute([("RPUSH", messages[n % 40], n) for n in range(512)])
        lists = await client.execute([("LRANGE", key, 0, -1) for key in messages])
    finally:
        await client.close()
    for i, values in enumerate(lists):
        assert [int(v) for v in values] == list(range(i, 512, 40))


async def test_moved_after_a_slot_migration_reads_the_map_and_keeps_order(
    redis_cluster: EmbeddedCluster, cluster_url: str
) -> None:
    client = cluster_client(cluster_url)
    tag = "moving"
    slot = key_slot(tag.encode())
    try:
        await client.execute([("RPUSH", f"{{{tag}}}:log", 0)])
        source = redis_cluster.owner(slot)
        assert client.owner(slot) == ("127.0.0.1", source.port)
        target = other_master(redis_cluster, source)
        await asyncio.to_thread(start_migration, redis_cluster, slot, target)
        await asyncio.to_thread(finish_migration, redis_cluster, slot, source, target)
        # the client still believes the source owns the slot: MOVED, then all resent in order
        replies = await client.execute(
            [("RPUSH", f"{{{tag}}}:log", n) for n in range(1, 101)] + [("LRANGE", f"{{{tag}}}:log", 0, -1)]
        )
        assert client.owner(slot) == ("127.0.0.1", target.port)
    finally:
        await client.close()
    assert [int(v) for v in replies[-1]] == list(range(101))


async def test_ask_during_a_migration_reaches_the_importing_master(
    redis_cluster: EmbeddedCluster, cluster_url: str
) -> None:
    tag = tag_in_slot(key_slot(b"asking"), "ask")
    slot = key_slot(tag.encode())
    moved_key, staying_key, new_key = f"{{{tag}}}:a", f"{{{tag}}}:b", f"{{{tag}}}:c"
    client = cluster_client(cluster_url)
    try:
        await client.execute([("SET", moved_key, "a"), ("SET", staying_key, "b")])
        source = redis_cluster.owner(slot)
        target = other_master(redis_cluster, source)
        await asyncio.to_thread(start_migration, redis_cluster, slot, target)
        await asyncio.to_thread(move_keys, source, target, [moved_key])
        replies = await client.execute([("GET", moved_key), ("GET", staying_key), ("SET", new_key, "c")])
        assert replies == [b"a", b"b", b"OK"]
        assert client.owner(slot) == ("127.0.0.1", source.port), "ASK does not change the map"
        with target.client() as direct:  # the new key was created on the importing master
            assert direct.execute_command("ASKING") and direct.get(new_key) == b"c"
        await asyncio.to_thread(finish_migration, redis_cluster, slot, source, target)
        assert await client.execute([("MGET", moved_key, staying_key, new_key)]) == [[b"a", b"b", b"c"]]
    finally:
        await client.close()


async def test_tryagain_mid_migration_is_retried_until_the_slot_settles(
    redis_cluster: EmbeddedCluster, cluster_url: str
) -> None:
    tag = "retry"
    slot = key_slot(tag.encode())
    first, second = f"{{{tag}}}:a", f"{{{tag}}}:b"
    client = cluster_client(cluster_url, timeout_s=t(10))
    try:
        await client.execute([("SET", first, "1"), ("SET", second, "2")])
        source = redis_cluster.owner(slot)
        target = other_master(redis_cluster, source)
        await asyncio.to_thread(start_migration, redis_cluster, slot, target)
        await asyncio.to_thread(move_keys, source, target, [first])
        before = _tryagain_count(target)
        both = asyncio.create_task(client.execute([("MGET", first, second)]))
        await wait_until(lambda: _tryagain_count(target) > before)  # ASK, then TRYAGAIN: half the keys moved
        assert not both.done()
        await asyncio.to_thread(finish_migration, redis_cluster, slot, source, target)
        assert await asyncio.wait_for(both, t(10)) == [[b"1", b"2"]]
    finally:
        await client.close()


def _tryagain_count(node: ClusterNode) -> int:
    with node.client() as direct:
        stats = direct.info("errorstats")
    return int(stats.get("errorstat_TRYAGAIN", {}).get("count", 0))


async def test_a_killed_master_fails_the_call_then_its_promoted_replica_serves(
    redis_cluster: EmbeddedCluster, cluster_url: str
) -> None:
    client = cluster_client(cluster_url, timeout_s=t(1))
    key = "{failover}:k"
    slot = key_slot(b"failover")
    master = redis_cluster.owner(slot)
    try:
        assert await client.execute([("SET", key, "kept"), ("WAIT", 1, 0)]) == [b"OK", 1]
        promoted = await fail_over(redis_cluster, master)
        try:
            async with asyncio.timeout(t(10)):
                while True:
                    try:
                        (value,) = await client.execute([("GET", key)])
                        break
                    except redis.exceptions.ConnectionError:
                        await asyncio.sleep(0.05)  # what callers do: retry with backoff
            assert value == b"kept"
            assert client.owner(slot) == ("127.0.0.1", promoted.port)
        finally:
            await restore(redis_cluster, master)
    finally:
        await client.close()


async def test_a_single_redis_is_refused_clearly(redis_url: str) -> None:
    client = cluster_client(redis_url)
    with pytest.raises(redis.exceptions.ResponseError, match="cluster support disabled"):
        await client.execute([("PING",)])
    await client.close()


async def test_a_silent_master_times_out_and_the_next_call_works(
    redis_cluster: EmbeddedCluster, cluster_url: str
) -> None:
    client = cluster_client(cluster_url, timeout_s=0.2)
    key = "{paused}:k"
    paused = redis_cluster.owner(key_slot(b"paused"))
    other = next(f"{{o{i}}}:k" for i in range(100) if redis_cluster.owner(key_slot(f"o{i}".encode())).port != paused.port)
    try:
        assert await client.execute([("SET", key, "1"), ("SET", other, "2")]) == [b"OK", b"OK"]
        with paused.client() as admin:
            admin.execute_command("CLIENT", "PAUSE", 1000, "ALL")
        with pytest.raises(redis.exceptions.TimeoutError):
            await client.execute([("GET", key)])
        with pytest.raises(redis.exceptions.TimeoutError):
            await client.execute([("GET", other), ("GET", key)])  # one silent master of two is enough
        async with asyncio.timeout(t(5)):
            while True:
                try:
                    assert await client.execute([("GET", key)]) == [b"1"]
                    break
                except redis.exceptions.RedisError:
                    continue
    finally:
        await client.close()
