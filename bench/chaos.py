"""`python -m bench chaos`: the load test against 3 gateways and 2 workers while faults repeat.

Processes: Redis with its append-only file on (as compose runs it), 3 gateways, 2 synthetic
workers (20 tokens/s). The load is `bench.loadtest`'s clients (in this process): random
cancels, drops and resumes on another gateway, about 1,000 messages in the full run. The
faults start on a fixed beat, one at a time, and the schedule repeats:

- worker_kill: kill -9 a worker, start a new one;
- worker_stop: SIGSTOP a worker for 5 s (past its 3 s liveness: its jobs are reaped), SIGCONT;
- redis_refuses_writes: `CONFIG SET maxmemory 1` with `noeviction` for 3 s (every write is
  answered OOM), then `maxmemory 0`;
- redis_restart: SIGTERM Redis (as `docker compose restart` does), start it on its AOF;
- script_flush: SCRIPT FLUSH (the next call of every script answers NOSCRIPT);
- gateway_kill: kill -9 a gateway, start it again on its port.

A watcher restarts any gateway, worker or Redis that exits without the schedule having killed
it, and keeps the error lines of its log as evidence.

Figures (goal 0 for the first four): messages without exactly one terminal, as clients saw
them (none within the load test's terminal timeout, or two) and as Redis has them once the run
settled (still queued or running); seq gaps and duplicates seen by clients, across resumes;
processes that exited on their own; and, per fault, the time from its end to the next chunk
any client received (p99 over all faults). A missed goal is reported, not raised: the
benchmark describes how the product fares, and survives it misbehaving.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import redis as sync_redis

from bench.checker import Checker, Frame, MessageTrack
from bench.cluster import Cluster, Figures, Row, Server, progress
from bench.loadconfig import LoadConfig, Results
from bench.loadtest import raise_open_files_limit, run_load
from bench.stats import percentiles
from store import keys

NAME = "chaos"
RATE = 20
WORKER_ARGS = ("--engine", "synthetic", "--synthetic-rate", str(RATE), "--concurrency", "200")
FAULTS = ("worker_kill", "worker_stop", "redis_refuses_writes", "redis_restart", "script_flush", "gateway_kill")
EVIDENCE_LINES = 6


@dataclass(frozen=True)
class Shape:
    clients: int
    max_tokens: int
    cycles: int
    slot_s: float
    """A fault starts every `slot_s` seconds (the longest fault plus a pause)."""
    stop_s: float = 5.0
    refuse_s: float = 3.0
    warmup_s: float = 3.0
    terminal_timeout_s: float = 30.0
    settle_s: float = 60.0
    """After the load: how long Redis gets to end every message (detach grace and orphan
    cancels included)."""

    @property
    def load_s(self) -> float:
        return self.warmup_s + self.cycles * len(FAULTS) * self.slot_s


FULL = Shape(clients=20, max_tokens=40, cycles=2, slot_s=9.0)
QUICK = Shape(clients=6, max_tokens=20, cycles=1, slot_s=6.0, stop_s=4.0, refuse_s=2.0, warmup_s=2.0,
              terminal_timeout_s=20.0, settle_s=30.0)


class TimedChecker(Checker):
    """The load test's checker, also stamping each chunk's arrival and counting each
    message's terminals."""

    def __init__(self) -> None:
        super().__init__()
        self.chunk_times: list[float] = []
        self.terminal_counts: Counter[str] = Counter()
        self.expired: set[str] = set()

    def feed(self, frame: Frame) -> MessageTrack | None:
        track = super().feed(frame)
        if track is not None:
            if frame["type"] == "chunk":
                self.chunk_times.append(time.perf_counter())
            else:
                self.terminal_counts[track.message_id] += 1
        return track

    def expire(self, message_id: str, why: str) -> None:
        self.expired.add(message_id)
        super().expire(message_id, why)

    def without_one_terminal(self) -> list[str]:
        """Accepted messages that did not get exactly one terminal in time."""
        return sorted(m for m in self.messages if m in self.expired or self.terminal_counts[m] != 1)


@dataclass
class Fault:
    kind: str
    started: float
    ended: float = 0.0
    target: str = ""
    failed: str = ""
    """Why the fault could not be injected (not a product failure)."""
    recovery_s: float | None = None
    """From the fault's end to the next chunk a client received (None: none came)."""


@dataclass
class Exit:
    name: str
    returncode: int | None
    at_s: float
    evidence: list[str] = field(default_factory=list)


class Chaos:
    """The fault schedule and the watcher, around one cluster."""

    def __init__(self, cluster: Cluster, shape: Shape, seed: int = 1) -> None:
        self.cluster = cluster
        self.shape = shape
        self.rng = random.Random(seed)
        self.ours: set[int] = set()
        """Pids the schedule killed (their exit is not the product's doing)."""
        self.surgery = asyncio.Lock()
        """Held while a process is being killed or replaced."""
        self.faults: list[Fault] = []
        self.exits: list[Exit] = []
        self.started = time.perf_counter()

    # --- the schedule -------------------------------------------------------------------

    async def schedule(self) -> None:
        actions: dict[str, Callable[[], Awaitable[str]]] = {
            "worker_kill": self.worker_kill, "worker_stop": self.worker_stop,
            "redis_refuses_writes": self.redis_refuses_writes, "redis_restart": self.redis_restart,
            "script_flush": self.script_flush, "gateway_kill": self.gateway_kill,
        }
        beat = self.started + self.shape.warmup_s
        for cycle in range(self.shape.cycles):
            for kind in FAULTS:
                await asyncio.sleep(max(0.0, beat - time.perf_counter()))
                beat += self.shape.slot_s
                fault = Fault(kind, time.perf_counter())
                try:
                    fault.target = await actions[kind]()
                except Exception as exc:  # the fault could not be injected: say so, go on
                    fault.failed = f"{type(exc).__name__}: {exc}"
                fault.ended = time.perf_counter()
                self.faults.append(fault)
                progress(f"{NAME}: cycle {cycle + 1}, {kind} {fault.target}"
                         f"{' FAILED ' + fault.failed if fault.failed else ''} "
                         f"({fault.ended - fault.started:.1f} s)")

    async def worker_kill(self) -> str:
        async with self.surgery:
            victim = self.rng.choice([w for w in self.cluster.workers if w.alive()])
            await self._kill(victim)
            self.cluster.workers.remove(victim)
            self.cluster.add_worker(*WORKER_ARGS)
        return victim.name

    async def worker_stop(self) -> str:
        victim = self.rng.choice([w for w in self.cluster.workers if w.alive()])
        victim.popen.send_signal(signal.SIGSTOP)
        try:
            await asyncio.sleep(self.shape.stop_s)
        finally:
            if victim.alive():
                victim.popen.send_signal(signal.SIGCONT)
        return victim.name

    async def redis_refuses_writes(self) -> str:
        await self._admin("CONFIG", "SET", "maxmemory-policy", "noeviction")
        await self._admin("CONFIG", "SET", "maxmemory", "1")
        try:
            await asyncio.sleep(self.shape.refuse_s)
        finally:
            await self._admin("CONFIG", "SET", "maxmemory", "0")
        return f"{self.shape.refuse_s:.0f} s"

    async def redis_restart(self) -> str:
        async with self.surgery:
            self.ours.add(self.cluster.redis.pid)
            await self.cluster.restart_redis()
        return "SIGTERM, AOF reload"

    async def script_flush(self) -> str:
        await self._admin("SCRIPT", "FLUSH")
        return ""

    async def gateway_kill(self) -> str:
        async with self.surgery:
            victim = self.rng.choice([g for g in self.cluster.gateways if g.alive()])
            await self._kill(victim)
            self.cluster.gateways.remove(victim)
            self.cluster.add_gateway(port=victim.port)
        return victim.name

    async def _kill(self, server: Server) -> None:
        self.ours.add(server.pid)
        server.popen.send_signal(signal.SIGCONT)
        server.popen.kill()
        await asyncio.to_thread(server.popen.wait)

    async def _admin(self, *command: str) -> Any:
        """One admin command, retried for a few seconds (a restoring command must land)."""
        deadline = time.monotonic() + 10.0
        while True:
            client = self.cluster.redis_client()
            try:
                return await asyncio.to_thread(client.execute_command, *command)
            except sync_redis.RedisError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
            finally:
                client.close()

    # --- the watcher --------------------------------------------------------------------

    async def watch(self) -> None:
        """Every half second: replace any process that exited unasked, and record why."""
        while True:
            await asyncio.sleep(0.5)
            async with self.surgery:
                await self._replace_exited()

    async def _replace_exited(self) -> None:
        for server in [*self.cluster.gateways, *self.cluster.workers, self.cluster.redis]:
            if server.alive() or server.pid in self.ours:
                continue
            self.ours.add(server.pid)
            exit_ = Exit(server.name, server.popen.returncode, round(time.perf_counter() - self.started, 1),
                         evidence(server))
            self.exits.append(exit_)
            progress(f"{NAME}: {server.name} exited on its own ({server.popen.returncode}); restarting it")
            if server in self.cluster.gateways:
                self.cluster.gateways.remove(server)
                self.cluster.add_gateway(port=server.port)
            elif server in self.cluster.workers:
                self.cluster.workers.remove(server)
                self.cluster.add_worker(*WORKER_ARGS)
            else:
                await self.cluster.restart_redis()


def evidence(server: Server) -> list[str]:
    """Why a process stopped, from its log: its error lines (event, task, error and the last
    line of the exception), then its last line."""
    found: list[str] = []
    lines = server.log_tail(1_000_000).splitlines()
    for line in lines:
        if line.startswith("{"):
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("level") not in ("error", "critical"):
                continue
            fields = " ".join(f"{k}={record[k]}" for k in ("event", "task", "request", "error") if k in record)
            exception = str(record.get("exception") or "").strip().splitlines()
            found.append(fields + (f" | {exception[-1]}" if exception else ""))
        elif line[:1].isalpha() and ("Error" in line or "Exception" in line):
            found.append(line)  # the last line of a traceback printed as text
    deduplicated = [line for i, line in enumerate(found) if i == 0 or line != found[i - 1]]
    last = lines[-1] if lines else ""
    return [line[:400] for line in deduplicated[-EVIDENCE_LINES:] + [f"last line: {last}"]]


# --- the run ------------------------------------------------------------------------------


async def _measure(shape: Shape) -> dict[str, Any]:
    raise_open_files_limit()
    async with Cluster(NAME, redis_aof=True) as cluster:
        for _ in range(3):
            cluster.add_gateway()
        for _ in range(2):
            cluster.add_worker(*WORKER_ARGS)
        await cluster.wait_ready()
        config = LoadConfig(
            urls=[f"ws://127.0.0.1:{g.port}/ws" for g in cluster.gateways], clients=shape.clients,
            messages=None, duration_s=shape.load_s, max_tokens=shape.max_tokens, cancel_rate=0.3,
            reconnect_rate=0.2, terminal_timeout_s=shape.terminal_timeout_s, ramp_s=1.0, reconnect_window_s=60.0,
            run_id=f"chaos{int(time.time()):x}{os.getpid():x}",
        )
        chaos = Chaos(cluster, shape)
        checker = TimedChecker()
        watcher = asyncio.create_task(chaos.watch())
        schedule = asyncio.create_task(chaos.schedule())
        try:
            results, _checker, wall_s = await run_load(config, checker=checker)
            await schedule
            settled, unfinished, pending = await _settle(cluster, shape.settle_s)
            async with chaos.surgery:
                await chaos._replace_exited()
        finally:
            for task in (schedule, watcher):
                task.cancel()
            await asyncio.gather(schedule, watcher, return_exceptions=True)
        return _figures(shape, chaos, checker, results, wall_s, settled, unfinished, pending)


async def _settle(cluster: Cluster, timeout_s: float) -> tuple[bool, list[dict[str, str]], int]:
    """Wait until Redis holds no queued or running message; (settled, what is left, pending
    job entries)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            unfinished, pending = await asyncio.to_thread(_unfinished, cluster)
        except sync_redis.RedisError as exc:
            progress(f"{NAME}: cannot read Redis while settling: {exc}")
            unfinished, pending = [{"error": str(exc)}], -1
        if not unfinished and pending == 0:
            return True, [], 0
        if time.monotonic() > deadline:
            return False, unfinished, pending
        await asyncio.sleep(1.0)


def _unfinished(cluster: Cluster) -> tuple[list[dict[str, str]], int]:
    client = cluster.redis_client()
    try:
        left = []
        for key in client.scan_iter(match=keys.META_PATTERN, count=1000):
            meta = {_text(k): _text(v) for k, v in client.hgetall(key).items()}
            if meta.get("state") in ("queued", "running"):
                left.append({"message_id": keys.message_of_key(key), **meta})
        pending = 0
        for stream in keys.Keyspace(int(client.hget(keys.CONFIG, "shards") or 1)).job_streams():
            try:
                pending += int(client.xpending(stream, keys.WORKER_GROUP)["pending"])
            except sync_redis.ResponseError:
                pass  # no stream yet
        return left, pending
    finally:
        client.close()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _figures(shape: Shape, chaos: Chaos, checker: TimedChecker, results: Results, wall_s: float,
             settled: bool, unfinished: list[dict[str, str]], pending: int) -> dict[str, Any]:
    times = checker.chunk_times
    for fault in chaos.faults:
        after = next((t for t in times if t >= fault.ended), None)
        fault.recovery_s = None if after is None else after - fault.ended
    recovered = [f.recovery_s for f in chaos.faults if f.recovery_s is not None]
    bad = checker.without_one_terminal()
    return {
        "shape": asdict(shape),
        "load_s": round(wall_s, 1),
        "messages": results.messages,
        "accepted": results.accepted,
        "terminals": dict(results.terminals),
        "errors": dict(results.errors),
        "cancel_results": dict(results.cancel_results),
        "reconnects": results.reconnects,
        "unplanned_reconnects": results.unplanned_reconnects,
        "chunks": results.chunks,
        "without_one_terminal": len(bad),
        "without_one_terminal_ids": bad[:50],
        "seq_gaps": checker.kinds["gap"] + checker.kinds["duplicate"],
        "violation_kinds": dict(checker.kinds),
        "violations": checker.violations[:200],
        "exits": [asdict(e) for e in chaos.exits],
        "faults": [asdict(f) | {"started": round(f.started - chaos.started, 2),
                                "ended": round(f.ended - chaos.started, 2)} for f in chaos.faults],
        "recovery_ms": percentiles(recovered),
        "faults_without_recovery": sum(1 for f in chaos.faults if f.recovery_s is None),
        "settled": settled,
        "unfinished_in_redis": len(unfinished),
        "unfinished_sample": unfinished[:20],
        "jobs_pending": pending,
    }


def run(quick: bool = False) -> tuple[Figures, list[Row]]:
    shape = QUICK if quick else FULL
    progress(f"{NAME}: 3 gateways, 2 workers, {shape.clients} clients for {shape.load_s:.0f} s; "
             f"{shape.cycles} cycle(s) of {', '.join(FAULTS)}")
    figures = asyncio.run(_measure(shape))
    return figures, rows(figures)


def rows(f: Figures) -> list[Row]:
    exits = f["exits"]
    out = [
        Row(NAME, "messages sent / accepted (load test)", f"{f['messages']:,} / {f['accepted']:,}",
            "terminals " + ", ".join(f"{k} {v}" for k, v in sorted(f["terminals"].items()))),
        Row(NAME, "messages without exactly one terminal (clients)", f"{f['without_one_terminal']:,}",
            f"of {f['accepted']:,} accepted", "0", f["without_one_terminal"] == 0),
        Row(NAME, "messages still queued/running in Redis after settling", f"{f['unfinished_in_redis']:,}",
            f"jobs pending {f['jobs_pending']}", "0", f["unfinished_in_redis"] == 0),
        Row(NAME, "seq gaps or duplicates seen by clients", f"{f['seq_gaps']:,}",
            f"{f['reconnects']} planned + {f['unplanned_reconnects']} unplanned resumes", "0", f["seq_gaps"] == 0),
        Row(NAME, "processes that exited on their own", f"{len(exits)}",
            ", ".join(sorted({e['name'].split('-')[0] for e in exits})) or "-", "0", not exits),
        Row(NAME, "fault end → next chunk delivered, p99 / max", f"{f['recovery_ms']['p99']:,.0f} / "
            f"{f['recovery_ms']['max']:,.0f} ms", f"{len(f['faults'])} faults, "
            f"{f['faults_without_recovery']} without a chunk after"),
    ]
    kinds: dict[str, list[dict[str, Any]]] = {}
    for fault in f["faults"]:
        kinds.setdefault(fault["kind"], []).append(fault)
    for kind, faults in kinds.items():
        delays = [x["recovery_s"] for x in faults if x["recovery_s"] is not None]
        notes = [f"{n} {what}" for n, what in (
            (len(faults) - len(delays), "without a chunk after"), (sum(1 for x in faults if x["failed"]), "not injected"),
        ) if n]
        out.append(Row(NAME, f"  {kind} ×{len(faults)}: end → next chunk, max",
                       f"{max(delays) * 1000:,.0f} ms" if delays else "no chunk after", ", ".join(notes)))
    counted = ("gap", "duplicate", "missing_terminal", "second_terminal", "after_terminal")
    other = {k: v for k, v in f["violation_kinds"].items() if k not in counted}
    out.append(Row(NAME, "other protocol violations", f"{sum(other.values()):,}",
                   ", ".join(f"{k} {v}" for k, v in sorted(other.items())) or "-", "0", not other))
    return out
