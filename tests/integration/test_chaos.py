"""Chaos: real processes, real signals, exact accounting.

Every accepted message gets exactly one terminal event; every resumed stream has contiguous
seq. Each test runs on its own Redis (append-only, fsync always) so it can kill it.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis as sync_redis

from protocol.ids import tag_of
from store import embedded, keys
from store.keys import Keyspace
from tests.cluster import healthy_and_flushed
from tests.support import (
    JOBS_STREAM,
    KEYSPACE,
    TERMINALS,
    Client,
    ProcessCluster,
    Proc,
    assert_stream_ok,
    client,
    http_get,
    t,
    wait_until,
)

pytestmark = pytest.mark.chaos


class PrivateRedis:
    def __init__(self, directory: Path) -> None:
        self.port = embedded.free_port()
        self.dir = directory
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = embedded.start(self.port, self.dir, persist=True, extra=["--appendfsync", "always"])

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def client(self) -> sync_redis.Redis:
        return sync_redis.Redis.from_url(self.url)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    r = PrivateRedis(tmp_path / "redis")
    r.start()
    try:
        yield r
    finally:
        if r.proc is not None and r.proc.poll() is None:
            r.kill()


@pytest.fixture
def chaos_cluster(private_redis: PrivateRedis, tmp_path: Path) -> Iterator[ProcessCluster]:
    c = ProcessCluster(private_redis.url, tmp_path)
    try:
        yield c
    finally:
        c.stop()


def synthetic(rate: float = 50, concurrency: int = 5) -> tuple[str, ...]:
    return ("--engine", "synthetic", "--synthetic-rate", str(rate), "--concurrency", str(concurrency))


SyncRedis = sync_redis.Redis | sync_redis.RedisCluster


@dataclass
class Target:
    """Processes on a single Redis (AOF, fsync always) or on the session's Redis Cluster, and
    a client of that Redis."""

    cluster: ProcessCluster
    redis: SyncRedis

    def keyspace(self) -> Keyspace:
        """The keys of the deployment, as its processes recorded it."""
        return Keyspace(int(self.redis.hget(keys.CONFIG, "shards") or 1))


@pytest.fixture(params=["single", "cluster"])
async def chaos(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Target]:
    if request.param == "single":
        private: PrivateRedis = request.getfixturevalue("private_redis")
        target = Target(ProcessCluster(private.url, tmp_path), private.client())
    else:
        embedded_cluster = await healthy_and_flushed(request.getfixturevalue("redis_cluster"))
        url = embedded_cluster.url
        target = Target(ProcessCluster(url, tmp_path, cluster=True), sync_redis.RedisCluster.from_url(url))
    try:
        yield target
    finally:
        target.cluster.stop()
        target.redis.close()


def owner_of(cluster: ProcessCluster, r: SyncRedis, message_id: str) -> Proc:
    worker_id = r.hget(keys.meta(message_id), "worker")
    assert worker_id is not None
    pid = int(worker_id.decode().split("-")[-2])
    return next(p for p in cluster.workers if p.popen is not None and p.popen.pid == pid)


def kill_owner(cluster: ProcessCluster, r: SyncRedis, message_id: str) -> None:
    """SIGKILL the worker generating a message and wait until it is gone."""
    owner = owner_of(cluster, r, message_id)
    owner.signal(signal.SIGKILL)
    assert owner.popen is not None
    owner.popen.wait(timeout=t(10))


async def start(cluster: ProcessCluster, gateways: int, workers: int, rate: float = 50) -> list[Proc]:
    started = [cluster.add_gateway() for _ in range(gateways)]
    for _ in range(workers):
        cluster.add_worker(*synthetic(rate=rate))
    await cluster.wait_healthy()
    return started


async def health_is(port: int, status: int) -> bool:
    return (await http_get(port, "/healthz"))[0] == status


async def streaming(c: Client, mid: str, min_seq: int = 3) -> None:
    await c.wait_for(lambda f: f["type"] == "chunk" and f["message_id"] == mid and f["seq"] >= min_seq)


async def test_worker_killed_mid_stream_client_hears_worker_lost(
    chaos: Target,
) -> None:
    chaos_cluster, r = chaos.cluster, chaos.redis
    (gw,) = await start(chaos_cluster, gateways=1, workers=2)
    async with client(gw.port or 0, "alice") as a:
        mid = await a.chat("s", max_tokens=1000)
        await streaming(a, mid)
        kill_owner(chaos_cluster, r, mid)
        killed = time.monotonic()
        end = await a.terminal(mid, timeout=15)
        heard_after = time.monotonic() - killed
        assert end["type"] == "error" and end["code"] == "worker_lost"
        assert_stream_ok(a, mid)
        assert heard_after < t(8), heard_after
        after = await a.chat("s2", max_tokens=5)
        assert (await a.terminal(after))["type"] == "done"
        history = await a.request(type="history", session_id="s")
        assert history["turns"][-1]["status"] == "error" and history["turns"][-1]["text"] == a.text(mid)
    print(f"worker death -> client heard worker_lost after {heard_after:.2f}s")


async def test_stop_after_the_worker_died_ends_at_once_and_the_reaper_keeps_the_text(
    chaos: Target,
) -> None:
    chaos_cluster, r = chaos.cluster, chaos.redis
    """The store ends a cancelled message itself: a Stop needs no live worker, and the
    worker that reclaims the dead one's job saves the partial text in history."""
    (gw,) = await start(chaos_cluster, gateways=1, workers=2)
    async with client(gw.port or 0, "alice") as a:
        mid = await a.chat("s", max_tokens=1000)
        await streaming(a, mid)
        kill_owner(chaos_cluster, r, mid)
        assert (await a.cancel(message_id=mid))["status"] == "cancelling"
        end = await a.terminal(mid, timeout=5)
        assert end["type"] == "cancelled"
        assert_stream_ok(a, mid)

        keyspace = chaos.keyspace()

        def reclaimed_and_saved() -> bool:
            pending = r.xpending(keyspace.jobs(tag_of(mid)), keys.WORKER_GROUP)["pending"]
            return pending == 0 and r.hexists(keyspace.answers("alice", "s"), mid)

        await wait_until(reclaimed_and_saved, timeout=15)
        history = await a.request(type="history", session_id="s")
        assert history["turns"][-1]["status"] == "cancelled"
        assert history["turns"][-1]["text"] == a.text(mid) != ""


async def test_worker_paused_past_liveness_then_resumed_cannot_corrupt_the_stream(
    chaos: Target,
) -> None:
    chaos_cluster, r = chaos.cluster, chaos.redis
    (gw,) = await start(chaos_cluster, gateways=1, workers=2)
    async with client(gw.port or 0, "alice") as a:
        mid = await a.chat("s", max_tokens=1000)
        await streaming(a, mid)
        paused = owner_of(chaos_cluster, r, mid)
        paused.signal(signal.SIGSTOP)
        end = await a.terminal(mid, timeout=15)
        assert end["type"] == "error" and end["code"] == "worker_lost"
        paused.signal(signal.SIGCONT)
        await wait_until(lambda: '"job_lost"' in paused.log_path.read_text())
        resumed = await a.chat("s2", max_tokens=5)
        await a.terminal(resumed)
        assert_stream_ok(a, mid)
        assert [e["type"] for e in a.events(mid)].count("error") == 1
        log = r.xrange(keys.log(mid))
        assert [int(entry_id.split(b"-")[0]) for entry_id, _ in log] == list(range(1, len(log) + 1))


async def test_gateway_killed_client_resumes_on_another(chaos: Target) -> None:
    chaos_cluster = chaos.cluster
    g1, g2 = await start(chaos_cluster, gateways=2, workers=1, rate=100)
    async with client(g1.port or 0, "alice") as a:
        mid = await a.chat("s", max_tokens=300)
        await streaming(a, mid, 5)
        g1.signal(signal.SIGKILL)
        with pytest.raises(ConnectionError):
            await a.wait_for(lambda f: False, timeout=10)
    last = a.chunks(mid)[-1]["seq"]
    async with client(g2.port or 0, "alice") as b:
        await b.send(type="resume", message_id=mid, after_seq=last)
        end = await b.terminal(mid)
        assert end["type"] == "done"
        assert_stream_ok(b, mid, after_seq=last)
        assert len((a.text(mid) + b.text(mid)).split()) == 300


async def test_gateway_sigterm_closes_1001_and_generation_continues_elsewhere(chaos: Target) -> None:
    chaos_cluster = chaos.cluster
    g1, g2 = await start(chaos_cluster, gateways=2, workers=1, rate=100)
    async with client(g1.port or 0, "alice") as a:
        mid = await a.chat("s", max_tokens=200)
        await streaming(a, mid)
        g1.signal(signal.SIGTERM)
        with pytest.raises(ConnectionError):
            await a.wait_for(lambda f: False, timeout=10)
        assert a.ws.close_code == 1001
    assert g1.popen is not None and g1.popen.wait(t(10)) == 0
    last = a.chunks(mid)[-1]["seq"]
    async with client(g2.port or 0, "alice") as b:
        await b.send(type="resume", message_id=mid, after_seq=last)
        assert (await b.terminal(mid))["type"] == "done"
        assert_stream_ok(b, mid, after_seq=last)


async def test_worker_sigterm_finishes_what_it_holds_and_takes_nothing_new(
    chaos_cluster: ProcessCluster, private_redis: PrivateRedis
) -> None:
    gw = chaos_cluster.add_gateway()
    first = chaos_cluster.add_worker(*synthetic(rate=100))
    await chaos_cluster.wait_healthy()
    async with client(gw.port or 0, "alice") as a:
        mid = await a.chat("s", max_tokens=150)
        await streaming(a, mid)
        first.signal(signal.SIGTERM)
        assert (await a.terminal(mid))["type"] == "done"
        assert_stream_ok(a, mid)
        assert first.popen is not None and first.popen.wait(t(10)) == 0
        chaos_cluster.add_worker(*synthetic(rate=100))
        later = await a.chat("s2", max_tokens=5)
        assert (await a.terminal(later, timeout=20))["type"] == "done"
        assert owner_of(chaos_cluster, private_redis.client(), later) is not first


async def test_redis_killed_and_restarted(chaos_cluster: ProcessCluster, private_redis: PrivateRedis) -> None:
    gw = chaos_cluster.add_gateway()
    chaos_cluster.add_worker(*synthetic(rate=50))
    await chaos_cluster.wait_healthy()
    port = gw.port or 0
    async with client(port, "alice") as a:
        mid = await a.chat("s", max_tokens=300)
        await streaming(a, mid)
        private_redis.kill()
        await wait_until(lambda: health_is(port, 503))
        started = time.monotonic()
        refused = await a.request(type="chat", session_id="s2", text="x", request_id="r")
        assert refused["code"] == "unavailable" and time.monotonic() - started < t(3)
        assert (await a.request(type="heartbeat", ts=2.0))["type"] == "heartbeat_ack"
        private_redis.start()
        restarted = time.monotonic()
        await wait_until(lambda: health_is(port, 200), timeout=15)
        healthy_after = time.monotonic() - restarted
        replies: list[dict[str, Any]] = []

        async def chat_accepted() -> bool:
            replies.append(await a.request(type="chat", session_id="s3", text="x", max_tokens=5))
            return bool(replies[-1]["type"] == "accepted")

        await wait_until(chat_accepted, timeout=20)
        assert (await a.terminal(replies[-1]["message_id"], timeout=20))["type"] == "done"
        end = await a.terminal(mid, timeout=30)
        assert end["type"] in TERMINALS
        assert_stream_ok(a, mid)
    print(f"redis restart -> gateway healthy after {healthy_after:.2f}s; in-flight stream ended {end['type']}")


class WriteStepper:
    """Lets the cluster's Redis writes through one batch at a time, every worker stopped
    (SIGSTOP) while a batch runs: `CLIENT PAUSE WRITE` holds each write that arrives; a step
    stops the workers, releases what was held, pauses writes again, and returns the stopped
    workers. Whatever a batch wrote (a CLAIM, a TAKEOVER) is then visible in Redis before the
    worker that sent it can read the reply and act on it, so a test can kill the worker that
    has just taken a job before it writes a single chunk of it."""

    PAUSE_MS = 60_000

    def __init__(self, r: sync_redis.Redis, cluster: ProcessCluster) -> None:
        self.r = r
        self.cluster = cluster
        self.own_id = r.client_id()

    def pause(self) -> None:
        self.r.execute_command("CLIENT", "PAUSE", self.PAUSE_MS, "WRITE")

    def release(self) -> None:
        self.r.execute_command("CLIENT", "UNPAUSE")
        for proc in self.live_workers():
            proc.signal(signal.SIGCONT)

    def live_workers(self) -> list[Proc]:
        return [p for p in self.cluster.workers if p.popen is not None and p.popen.poll() is None]

    def writes_held(self) -> bool:
        """Some client waits on the pause (a worker blocked in XREADGROUP waits on its stream)."""
        return any(
            "b" in c["flags"] and c["cmd"] != "xreadgroup" and int(c["id"]) != self.own_id
            for c in self.r.client_list()
        )

    def step(self) -> list[Proc]:
        stopped = self.live_workers()
        for proc in stopped:
            proc.signal(signal.SIGSTOP)
        for proc in stopped:
            assert proc.popen is not None
            while _process_state(proc.popen.pid) not in "TtZX":
                time.sleep(0.001)
        self.r.execute_command("CLIENT", "UNPAUSE")
        self.pause()
        return stopped


def _process_state(pid: int) -> str:
    """The state letter of /proc/PID/stat (T: stopped; Z, X: dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return "X"
    return stat[stat.rindex(")") + 2]


def just_taken_by(r: sync_redis.Redis, workers: list[Proc]) -> Proc | None:
    """The worker (among `workers`) that runs a message which has no chunk stored yet."""
    by_pid = {p.popen.pid: p for p in workers if p.popen is not None}
    for key in r.keys(keys.META_PATTERN):
        state, last_seq, worker_id = r.hmget(key, ["state", "last_seq", "worker"])
        if state == b"running" and last_seq == b"0" and worker_id is not None:
            owner = by_pid.get(int(worker_id.decode().split("-")[-2]))
            if owner is not None:
                return owner
    return None


async def test_poison_job_goes_to_dead_letter_after_three_deliveries(
    chaos_cluster: ProcessCluster, private_redis: PrivateRedis
) -> None:
    """A job whose worker dies before its first chunk, three times over (each worker is
    killed right after it claims or takes over the job), is dead-lettered on its fourth
    delivery and ends `worker_lost` at seq 0; the cluster keeps serving."""
    gw = chaos_cluster.add_gateway()
    chaos_cluster.add_worker(*synthetic())
    await chaos_cluster.wait_healthy()
    r = private_redis.client()
    stepper = WriteStepper(r, chaos_cluster)
    killed: list[Proc] = []

    def kill_each_new_owner() -> bool:
        if not stepper.writes_held():
            return False
        stopped = stepper.step()
        owner = just_taken_by(r, stopped)
        if owner is not None:
            owner.signal(signal.SIGKILL)
            assert owner.popen is not None
            owner.popen.wait(t(10))
            killed.append(owner)
        for proc in stopped:
            if proc is not owner:
                proc.signal(signal.SIGCONT)
        if not stepper.live_workers():
            chaos_cluster.add_worker(*synthetic())
        return len(killed) == 3

    async with client(gw.port or 0, "alice") as a:
        stepper.pause()
        try:
            await a.send(type="chat", session_id="s", text="poison", max_tokens=10)
            await wait_until(kill_each_new_owner, timeout=60, interval=0.01)
        finally:
            stepper.release()
        accepted = await a.wait_for(lambda f: f["type"] == "accepted")
        mid = accepted["message_id"]
        end = await a.terminal(mid, timeout=30)
        assert end["type"] == "error" and end["code"] == "worker_lost" and end["seq"] == 0
        assert a.chunks(mid) == []
        dead = r.xrange(keys.DEAD_STREAM)
        assert len(dead) == 1 and int(dead[0][1][b"deliveries"]) == 4
        assert all(p.popen is not None and p.popen.returncode == -signal.SIGKILL for p in killed)
        healthy = await a.chat("s2", "fine", max_tokens=3)
        assert (await a.terminal(healthy, timeout=20))["type"] == "done"
