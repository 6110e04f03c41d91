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

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.crc import key_slot

from store import keys
from store.embedded import ClusterNode, EmbeddedCluster
from tests.cluster import healthy_and_flushed, restore
from tests.support import ProcessCluster, assert_stream_ok, client, t, wait_until

pytestmark = pytest.mark.chaos


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[list[ProcessCluster]]:
    made: list[ProcessCluster] = []
    try:
        yield made
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


async def test_a_killed_master_loses_nothing_a_client_saw(
    redis_cluster: EmbeddedCluster, processes: list[ProcessCluster], tmp_path: Path
) -> None:
    embedded = await healthy_and_flushed(redis_cluster)
    cluster = ProcessCluster(embedded.url, tmp_path, cluster=True)
    processes.append(cluster)
    g1, g2 = cluster.add_gateway(), cluster.add_gateway()
    cluster.add_worker("--engine", "synthetic", "--synthetic-rate", "40")
    await cluster.wait_healthy(timeout=30)
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


async def test_an_end_is_published_only_once_a_replica_has_it(
    redis_cluster: EmbeddedCluster, processes: list[ProcessCluster], tmp_path: Path
) -> None:
    """With its master's replica stopped, a message cannot end: its terminal would be lost
    with the master. The worker keeps trying; once the replica is back, it ends, once."""
    embedded = await healthy_and_flushed(redis_cluster)
    cluster = ProcessCluster(embedded.url, tmp_path, cluster=True)
    processes.append(cluster)
    gw = cluster.add_gateway()
    cluster.add_worker("--engine", "synthetic", "--synthetic-rate", "100")
    await cluster.wait_healthy(timeout=30)
    async with client(gw.port or 0, "alice") as a:
        mid = await a.chat("s", max_tokens=60)
        await a.wait_for(lambda f: f["type"] == "chunk" and f["message_id"] == mid)
        master = embedded.owner(key_slot(keys.meta(mid).encode()))
        (replica,) = embedded.replicas_of(master)
        replica.proc.send_signal(signal.SIGSTOP)
        try:
            await a.wait_for(lambda f: len(a.text(mid).split()) == 60, timeout=20)  # every token streamed
            with pytest.raises(TimeoutError):
                await a.terminal(mid, timeout=3)
            with master.client() as r:
                assert r.hget(keys.meta(mid), "state") == b"done", "written on the master, not yet published"
        finally:
            replica.proc.send_signal(signal.SIGCONT)
        end = await a.terminal(mid, timeout=t(20))
    assert end["type"] == "done"
    assert_stream_ok(a, mid)
