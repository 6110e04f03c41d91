"""Where a deployment's data lives, and the clients that reach it.

One Redis, or a Redis Cluster (`--redis-cluster`, any node's URL). On a cluster the hot paths go
through `store.cluster.ClusterClient` and `store.cluster_subscriber.ClusterSubscriber` (lean,
routed by slot), the rest through redis-py's `RedisCluster`; scripts publish with SPUBLISH where
the servers have sharded pub/sub (Redis 7), else PUBLISH. The number of shards (job streams,
hash tags: `store.keys.Keyspace`) is the deployment's: the first process to start records it in
`tr:config`, and a process asked for another number refuses to start.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.connection import parse_url
from redis.driver_info import DriverInfo

from store import ShardsMismatch, keys
from store.cluster import ClusterClient, CommandClient, has_sharded_pubsub
from store.cluster_subscriber import ClusterSubscriber, OnResubscribed
from store.keys import Keyspace
from store.lean import LeanClient
from store.retry import retry
from store.subscriber import OnMessage, Subscriber

Redis = aioredis.Redis
AnyRedis = aioredis.Redis | RedisCluster
SHARDS_PER_MASTER = 4
"""A cluster's default: shards are hash tags, so several per master spread the load."""

_DRIVER_INFO = DriverInfo()
"""Resolved once: redis-py otherwise reads its package metadata (an email-parser pass over
METADATA) for every new connection, a large share of a busy gateway's CPU."""


@dataclass(frozen=True, slots=True)
class Topology:
    url: str
    cluster: bool = False
    keyspace: Keyspace = field(default_factory=Keyspace)
    sharded_pubsub: bool = False
    """Scripts publish with SPUBLISH (a Redis 7 cluster) instead of PUBLISH."""

    @property
    def defer_ends(self) -> bool:
        """On a cluster: a terminal event is published only once a replica of its master has
        it, when that master has a replica at the time (`Store._ended` asks it with ROLE, so a
        replica that joins later counts, and a master left without one waits for none)."""
        return self.cluster

    @property
    def publish(self) -> str:
        return "SPUBLISH" if self.sharded_pubsub else "PUBLISH"

    def client(self, timeout_s: float | None = 2.0, max_connections: int = 2_000) -> AnyRedis:
        """redis-py's client (`RedisCluster` on a cluster) whose calls fail fast when Redis is
        down or paused (`timeout_s`).

        Blocking readers pass a longer `timeout_s`. redis-py 8's pool raises "Too many
        connections" past 100 concurrent calls, which looks exactly like Redis being down, so
        the limit is raised; past it a call still fails fast (unavailable) rather than queueing
        behind a saturated Redis. A pooled connection that Redis closed while it was idle costs
        one more try on a new one (what is sent through this client is safe to send twice:
        reads, SETs of leases and records, XACK, XCLAIM)."""
        options: dict[str, Any] = dict(
            driver_info=_DRIVER_INFO,
            max_connections=max_connections,
            socket_timeout=timeout_s,
            socket_connect_timeout=2.0,
            decode_responses=False,
            retry=Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,)),
        )
        if self.cluster:
            return RedisCluster.from_url(self.url, **options)
        pool = aioredis.ConnectionPool.from_url(self.url, health_check_interval=0, **options)
        return aioredis.Redis.from_pool(pool)

    def lean(self, timeout_s: float = 2.0) -> CommandClient:
        """The hot paths' pipelined client (`store.lean`, or `store.cluster` on a cluster)."""
        options: dict[str, Any] = parse_url(self.url)  # type: ignore[no-untyped-call]
        return ClusterClient(options, timeout_s) if self.cluster else LeanClient(options, timeout_s)

    async def subscriber(
        self, on_message: OnMessage, on_resubscribed: OnResubscribed | None = None, timeout_s: float = 2.0
    ) -> Subscriber | ClusterSubscriber:
        """A lean pub/sub connection (one per master on a cluster); `Unavailable` if Redis
        cannot be reached. On a cluster, `on_resubscribed` hears of channels subscribed again
        after a node was lost or a slot moved (their messages may have been missed)."""
        if self.cluster:
            return await ClusterSubscriber.open(self.url, on_message, on_resubscribed, timeout_s)
        return await Subscriber.open(self.url, on_message, timeout_s)


async def ready(client: AnyRedis) -> None:
    """Learn a cluster client's slot map before the first concurrent calls: redis-py's
    `RedisCluster` learns it on first use, and calls racing that first use fail, closing the
    client's connections under the others."""
    if isinstance(client, RedisCluster):
        await retry(client.initialize, "cluster_map")


def single(url: str, shards: int = 1) -> Topology:
    """One Redis (tests, benchmarks, `make run`)."""
    return Topology(url, keyspace=Keyspace(shards))


async def discover(url: str, *, cluster: bool = False, shards: int | None = None) -> Topology:
    """The deployment's topology: its shards as recorded in `tr:config` (recorded here when
    this process is the first: `shards`, else 1 on one Redis and `SHARDS_PER_MASTER` per master
    on a cluster); `ShardsMismatch` if `shards` differs from the record."""
    probe = Topology(url, cluster)
    client = probe.client()
    try:
        sharded_pubsub = False
        default = 1
        if cluster:
            lean = probe.lean()
            try:
                await lean.call("PING")
                assert isinstance(lean, ClusterClient)
                default = SHARDS_PER_MASTER * len(lean.masters())
                sharded_pubsub = await has_sharded_pubsub(lean)
            finally:
                await lean.close()
        wanted = shards or default
        await client.hsetnx(keys.CONFIG, "shards", wanted)
        recorded = int(await client.hget(keys.CONFIG, "shards") or wanted)
        if shards is not None and recorded != shards:
            raise ShardsMismatch(
                f"this deployment uses {recorded} shards (recorded in {keys.CONFIG}); "
                f"start with --shards {recorded}, or leave --shards out"
            )
        return Topology(url, cluster, Keyspace(recorded), sharded_pubsub)
    finally:
        await client.aclose()



def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`--redis-cluster` and `--shards`, as gateways and workers take them (PROTOCOL.md,
    "Running it")."""
    parser.add_argument(
        "--redis-cluster",
        action="store_true",
        default=os.environ.get("REDIS_CLUSTER", "") not in ("", "0"),
        help="the Redis URL names any node of a Redis Cluster (also REDIS_CLUSTER=1)",
    )
    parser.add_argument(
        "--shards",
        type=int,
        default=int(os.environ["TOKENRELAY_SHARDS"]) if os.environ.get("TOKENRELAY_SHARDS") else None,
        help="job streams and hash tags of the deployment (default: what it records, else 1 on one "
        f"Redis and {SHARDS_PER_MASTER} per master on a cluster; also TOKENRELAY_SHARDS)",
    )


async def discover_for(args: argparse.Namespace) -> Topology:
    """`discover` for a process started with `add_arguments`' flags, waiting for Redis (with
    backoff) if it cannot be reached yet."""
    return await retry(lambda: discover(args.redis_url, cluster=args.redis_cluster, shards=args.shards), "discover")
