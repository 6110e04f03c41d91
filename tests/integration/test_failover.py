"""A Redis Cluster master killed while a message streams on it (3 masters, 3 replicas).

Replication is asynchronous: writes a master acknowledged but had not yet sent to its replica
are lost when the replica takes over. Here the replica is stopped (SIGSTOP) and its link cut
(CLIENT KILL TYPE replica on the master) while chunks keep being written, so the loss is
certain, not a matter of timing: the master is then killed, the replica resumed and promoted,
and it lacks the last chunks the client already saw. The worker
writes them again from its own copy; the message ends with exactly one terminal, and a client
that resumes from the start on another gateway reads the very chunks the first one saw.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from redis.crc import key_slot

from store import embedded as embedded_redis
from store import keys
from store.embedded import ClusterNode, EmbeddedCluster
from tests.cluster import healthy_and_flushed, restore
from tests.support import Client, ProcessCluster, assert_stream_ok, client, t, wait_until

pytestmark = pytest.mark.chaos


@pytest.fixture(params=["6.2", "7"])
def replicaless_cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[EmbeddedCluster]:
    """A fresh cluster of 3 masters and no replicas, of its own: the test adds one."""
    server = "" if request.param == "6.2" else embedded_redis.redis7_server()
    if server is None:
        pytest.skip("no redis-server 7 on PATH (apt-get install redis-server)")
    cluster = embedded_redis.start_cluster(tmp_path / "nodes", masters=3, replicas=0, server=server, timeout_s=t(30))
    try:
        yield cluster
    finally:
        cluster.stop()


Deploy = Callable[..., Awaitable[ProcessCluster]]


@pytest.fixture
def deploy(tmp_path: Path) -> Iterator[Deploy]:
    """Start a deployment on a cluster: `gateways` gateways and a synthetic worker writing
    `rate` tokens/s, healthy; stopped at the end of the test."""
    made: list[ProcessCluster] = []

    async def start(url: str, *, rate: int, gateways: int = 1) -> ProcessCluster:
        cluster = ProcessCluster(url, tmp_path, cluster=True)
        made.append(cluster)
        for _ in range(gateways):
            cluster.add_gateway()
        cluster.add_worker("--engine", "synthetic", "--synthetic-rate", str(rate))
        await cluster.wait_healthy(timeout=30)
        return cluster

    try:
        yield start
    finally:
        for cluster in made:
            cluster.stop()


def promoted(cluster: EmbeddedCluster, replica: ClusterNode) -> bool:
    """`replica` serves as master and the cluster is ok again."""
    try:
        with replica.client() as r:
            info = r.execute_command("CLUSTER", "INFO")
            role = r.execute_command("ROLE")
    except Exception:
        return False
    return b"cluster_state:ok" in info and role[0] == b"master"


async def test_a_killed_master_loses_nothing_a_client_saw(redis_cluster: EmbeddedCluster, deploy: Deploy) -> None:
    embedded = await healthy_and_flushed(redis_cluster)
    cluster = await deploy(embedded.url, rate=40, gateways=2)
    g1, g2 = cluster.gateways
    async with client(g1.port or 0, "alice") as a:
        mid = await a.chat("s", max_tokens=400)
        await a.wait_for(lambda f: f["type"] == "chunk" and f["seq"] >= 5)
        master = embedded.owner(key_slot(keys.meta(mid).encode()))
        (replica,) = embedded.replicas_of(master)
        replica.proc.send_signal(signal.SIGSTOP)
        with master.client() as r:
            r.execute_command("CLIENT", "KILL", "TYPE", "replica")  # from now on it misses the master's writes
        try:
            stopped_at = a.chunks(mid)[-1]["seq"]
            await a.wait_for(lambda f: f["type"] == "chunk" and f["seq"] >= stopped_at + 10, timeout=20)
            master.kill()
        finally:
            replica.proc.send_signal(signal.SIGCONT)
        await wait_until(lambda: promoted(embedded, replica), timeout=30)
        end = await a.terminal(mid, timeout=60)
    assert end["type"] == "done", end
    assert_stream_ok(a, mid)
    seen = a.chunks(mid)
    assert len(a.text(mid).split()) == 400, "every token once, in order"
    async with client(g2.port or 0, "alice") as b:
        await b.send(type="resume", message_id=mid, after_seq=0)
        assert (await b.terminal(mid, timeout=20)) == end
        assert b.chunks(mid) == seen, "the store holds exactly what the first client saw"
    log = "".join(p.log_path.read_text() for p in cluster.workers)
    assert '"chunks_rewritten"' in log, "the failover did lose chunks, and the worker wrote them again"
    await restore(embedded, master)


async def test_an_end_is_published_only_once_a_replica_has_it(redis_cluster: EmbeddedCluster, deploy: Deploy) -> None:
    """With its master's replica stopped, a message cannot end: its terminal would be lost
    with the master. The worker keeps trying; once the replica is back, it ends, once."""
    embedded = await healthy_and_flushed(redis_cluster)
    (gw,) = (await deploy(embedded.url, rate=100)).gateways
    async with client(gw.port or 0, "alice") as a:
        mid = await a.chat("s", max_tokens=60)
        await a.wait_for(lambda f: f["type"] == "chunk" and f["message_id"] == mid)
        master = embedded.owner(key_slot(keys.meta(mid).encode()))
        (replica,) = embedded.replicas_of(master)
        await end_waits_for(replica, master, a, mid, tokens=60)


async def end_waits_for(replica: ClusterNode, master: ClusterNode, a: Client, mid: str, tokens: int) -> None:
    """With `replica` stopped, every token of `mid` streams but its end stays on the master;
    once the replica is back, the end goes out, once."""
    replica.proc.send_signal(signal.SIGSTOP)
    try:
        await a.wait_for(lambda f: len(a.text(mid).split()) == tokens, timeout=20)  # every token streamed
        with pytest.raises(TimeoutError):
            await a.terminal(mid, timeout=3)
        with master.client() as r:
            assert r.hget(keys.meta(mid), "state") == b"done", "written on the master, not yet published"
    finally:
        replica.proc.send_signal(signal.SIGCONT)
    end = await a.terminal(mid, timeout=t(20))
    assert end["type"] == "done"
    assert_stream_ok(a, mid)


async def test_a_replica_that_joins_later_holds_back_its_masters_ends(
    replicaless_cluster: EmbeddedCluster, deploy: Deploy
) -> None:
    """Gateways and workers start on a cluster whose masters have no replica (a young Redis 7
    cluster also looks so in CLUSTER SLOTS, for its first seconds). A replica added later
    counts from then on: with it stopped, a message of its master cannot end."""
    (gw,) = (await deploy(replicaless_cluster.url, rate=100)).gateways
    async with client(gw.port or 0, "alice") as a:
        first = await a.chat("s", max_tokens=5)
        assert (await a.terminal(first, timeout=t(10)))["type"] == "done", "no replica, no wait"
        master = replicaless_cluster.owner(key_slot(keys.meta(first).encode()))
        replica = await asyncio.to_thread(replicaless_cluster.add_replica, master, t(30))
        mid = await a.chat("s", max_tokens=60)
        await a.wait_for(lambda f: f["type"] == "chunk" and f["message_id"] == mid)
        await end_waits_for(replica, master, a, mid, tokens=60)


async def test_a_stop_ends_its_message_while_the_replica_is_stopped(
    redis_cluster: EmbeddedCluster, deploy: Deploy
) -> None:
    """A Stop must not wait on a replica: with the master's replica stopped, the cancel's end
    goes out once WAIT gives up (1 s), and it is in the log for a client that resumes. A Stop
    of a message whose worker's end waits for the replica does not publish that end."""
    embedded = await healthy_and_flushed(redis_cluster)
    g1, g2 = (await deploy(embedded.url, rate=40, gateways=2)).gateways
    async with client(g1.port or 0, "alice") as a, client(g2.port or 0, "alice") as b:
        first = await a.chat("s", max_tokens=400)  # the cancelling gateway learns the master has a replica
        await a.wait_for(lambda f: f["type"] == "chunk" and f["message_id"] == first)
        assert (await b.cancel(message_id=first))["status"] == "cancelling"
        assert (await a.terminal(first, timeout=t(5)))["type"] == "cancelled"
        mid = await a.chat("s", max_tokens=400)
        await a.wait_for(lambda f: f["type"] == "chunk" and f["message_id"] == mid)
        master = embedded.owner(key_slot(keys.meta(mid).encode()))
        (replica,) = embedded.replicas_of(master)
        replica.proc.send_signal(signal.SIGSTOP)
        try:
            result = await b.cancel(message_id=mid)
            assert result["status"] == "cancelling", result
            end = await a.terminal(mid, timeout=t(5))
            done = await a.chat("s", max_tokens=10)
            await a.wait_for(lambda f: len(a.text(done).split()) == 10, timeout=20)
            assert (await b.cancel(message_id=done))["status"] == "already_completed"
            with pytest.raises(TimeoutError):
                await a.terminal(done, timeout=2)
        finally:
            replica.proc.send_signal(signal.SIGCONT)
        assert end["type"] == "cancelled", end
        assert_stream_ok(a, mid)
        assert (await a.terminal(done, timeout=t(20)))["type"] == "done"
        await b.send(type="resume", message_id=mid, after_seq=0)
        assert (await b.terminal(mid, timeout=t(10))) == end
        assert b.chunks(mid) == a.chunks(mid)
