"""`tokenrelay-monitor` / `python -m clients.monitor`: a live view of a tokenrelay deployment.

Reads Redis only (no gateway or worker is asked anything but `GET /metrics`):
- instances: the `tr:inst:{kind}:{id}` hashes that gateways and workers refresh every 5 s;
  one is *stale* when its last beat is older than twice that interval, or (a worker) when
  its liveness key is gone: the reaper treats that worker as dead;
- the jobs stream: length, entries pending in the workers' group (claimed, not acked), and
  the backlog (accepted, not yet claimed: the size of `tr:backlog`, since Redis 6.2's XINFO
  has no `lag`), and the dead-letter stream's length;
- cancel and error rates: each gateway's `/metrics` counters, differenced between refreshes.

    python -m clients.monitor [--redis-url URL]          # live, refreshed every second
    python -m clients.monitor --once --json              # one snapshot as JSON, then exit
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from store import keys
from store.embedded import default_redis_url
from store.settings import Lifetimes

BEAT_INTERVAL_S = Lifetimes().instance_ttl_s / 3
STALE_AFTER_S = 2 * BEAT_INTERVAL_S
COUNTERS = ("tokenrelay_gateway_cancels_total", "tokenrelay_gateway_errors_total")
LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", socket.gethostname(), socket.getfqdn()}
_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^:@/\s]*):(?P<password>[^@\s]*)@")


def redact(text: str) -> str:
    """`text` with the password of every URL in it replaced by `***` (the user name stays)."""
    return _CREDENTIALS.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)


@dataclass(slots=True)
class Instance:
    kind: str
    id: str
    host: str
    pid: int
    uptime_s: float
    last_beat_age_s: float
    active: int
    stale: bool
    stale_reason: str | None = None
    port: int | None = None
    streams: int | None = None
    capacity: int | None = None
    alive_key: bool | None = None


@dataclass(slots=True)
class Snapshot:
    time: float
    instances: list[Instance]
    jobs_length: int
    backlog: int
    pending: int
    dead_letters: int
    rates: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _num(value: str | None, default: float = 0.0) -> float:
    try:
        return float(value) if value is not None else default
    except ValueError:
        return default


def to_instance(fields: dict[str, str], alive_key: bool | None, now: float) -> Instance:
    age = now - _num(fields.get("last_beat"))
    reason = None
    if age > STALE_AFTER_S:
        reason = f"last beat {age:.1f}s ago"
    elif alive_key is False:
        reason = "liveness key expired"
    port = fields.get("port")
    streams = fields.get("streams")
    capacity = fields.get("capacity")
    return Instance(
        kind=fields.get("kind", "?"),
        id=fields.get("id", "?"),
        host=fields.get("host", "?"),
        pid=int(_num(fields.get("pid"))),
        uptime_s=round(now - _num(fields.get("started"), now), 1),
        last_beat_age_s=round(age, 2),
        active=int(_num(fields.get("active"))),
        stale=reason is not None,
        stale_reason=reason,
        port=int(port) if port else None,
        streams=int(streams) if streams else None,
        capacity=int(capacity) if capacity else None,
        alive_key=alive_key,
    )


async def read_instances(r: aioredis.Redis, now: float) -> list[Instance]:
    names = sorted([key async for key in r.scan_iter(match=keys.INSTANCE_PREFIX + "*", count=500)])
    async with r.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.hgetall(name)
        hashes: list[dict[str, str]] = await pipe.execute()
    workers = [h.get("id", "") for h in hashes if h.get("kind") == "worker"]
    async with r.pipeline(transaction=False) as pipe:
        for wid in workers:
            pipe.exists(keys.alive(wid))
        alive = dict(zip(workers, (bool(x) for x in await pipe.execute())))
    return [to_instance(h, alive.get(h.get("id", "")) if h.get("kind") == "worker" else None, now)
            for h in hashes if h]


async def read_jobs(r: aioredis.Redis) -> tuple[int, int, int, int]:
    """(length of the job streams, entries pending in the workers' groups, backlog, dead
    letters), summed over the deployment's shards."""
    keyspace = keys.Keyspace(int(await r.hget(keys.CONFIG, "shards") or 1))
    length = queued = pending = 0
    for stream, backlog in zip(keyspace.job_streams(), keyspace.backlogs()):
        length += int(await r.xlen(stream))
        queued += int(await r.zcard(backlog))
        try:
            groups: list[dict[str, Any]] = await r.xinfo_groups(stream)
        except redis.exceptions.ResponseError:
            groups = []  # no stream yet
        pending += sum(int(g.get("pending", 0)) for g in groups if g.get("name") == keys.WORKER_GROUP)
    return length, pending, queued, int(await r.xlen(keys.DEAD_STREAM))


def parse_counters(text: str) -> dict[str, dict[str, float]]:
    """`{metric: {label value: value}}` for the COUNTERS (each has one label) in a Prometheus
    text exposition, read by prometheus_client's parser."""
    found: dict[str, dict[str, float]] = {name: {} for name in COUNTERS}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in found:
                label = next(iter(sample.labels.values()), "")
                found[sample.name][label] = sample.value
    return found


async def scrape(host: str, port: int, timeout_s: float = 1.0) -> dict[str, dict[str, float]] | None:
    """A gateway's counters from `GET /metrics`; None when it does not answer."""
    target = "127.0.0.1" if host in LOCAL_HOSTS else host
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(target, port)
            try:
                writer.write(f"GET /metrics HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n".encode())
                await writer.drain()
                data = await reader.read()
            finally:
                writer.close()
    except (OSError, TimeoutError):
        return None
    head, _, body = data.decode(errors="replace").partition("\r\n\r\n")
    if not head.startswith("HTTP/1.1 200"):
        return None
    return parse_counters(body)


class Monitor:
    def __init__(self, r: aioredis.Redis) -> None:
        self.r = r
        self._previous: dict[str, tuple[float, dict[str, dict[str, float]]]] = {}

    async def snapshot(self) -> Snapshot:
        now = time.time()
        instances = await read_instances(self.r, now)
        length, pending, backlog, dead = await read_jobs(self.r)
        snap = Snapshot(now, instances, length, backlog, pending, dead)
        snap.rates = await self._rates(instances)
        return snap

    async def _rates(self, instances: list[Instance]) -> dict[str, Any]:
        gateways = [i for i in instances if i.kind == "gateway" and i.port]
        scraped = await asyncio.gather(*(scrape(g.host, g.port or 0) for g in gateways))
        now = time.monotonic()
        totals = {"cancels_per_s": 0.0, "errors_per_s": 0.0}
        by_label: dict[str, dict[str, float]] = {"cancels_by_status": {}, "errors_by_code": {}}
        measured, unreachable = 0, []
        for gw, counters in zip(gateways, scraped):
            if counters is None:
                unreachable.append(gw.id)
                continue
            previous = self._previous.get(gw.id)
            self._previous[gw.id] = (now, counters)
            if previous is None or now <= previous[0]:
                continue
            measured += 1
            dt = now - previous[0]
            for metric, rate_key, label_key in (
                (COUNTERS[0], "cancels_per_s", "cancels_by_status"),
                (COUNTERS[1], "errors_per_s", "errors_by_code"),
            ):
                for name, value in counters[metric].items():
                    # a restarted gateway has a new id, so counters only go back on a reset
                    delta = max(value - previous[1][metric].get(name, 0.0), 0.0) / dt
                    totals[rate_key] += delta
                    by_label[label_key][name] = round(by_label[label_key].get(name, 0.0) + delta, 3)
        if measured == 0:
            return {"cancels_per_s": None, "errors_per_s": None, "gateways_measured": 0,
                    "unreachable": unreachable}
        return {**{k: round(v, 3) for k, v in totals.items()}, **by_label,
                "gateways_measured": measured, "unreachable": unreachable}


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def by_label(rates: dict[str, float] | None) -> str:
    busy = [f"{name} {value:.2f}/s" for name, value in sorted((rates or {}).items()) if value > 0]
    return f" ({', '.join(busy)})" if busy else ""


def render(snap: Snapshot, redis_url: str) -> Group:
    """Strings from Redis go in as `Text`, never as Rich markup: an instance id like
    `[red]...` is shown as it is."""
    table = Table(title=Text(f"tokenrelay instances ({redact(redis_url)})"), expand=False)
    for column in ("kind", "id", "host", "pid", "port", "uptime", "last beat", "active", "streams / cap", "state"):
        table.add_column(column, justify="right" if column in ("pid", "port", "active") else "left")
    for i in snap.instances:
        extra = i.streams if i.kind == "gateway" else i.capacity
        state = Text(f"STALE: {i.stale_reason}", style="red") if i.stale else Text("ok", style="green")
        table.add_row(Text(i.kind), Text(i.id), Text(i.host), str(i.pid), str(i.port or ""), _age(i.uptime_s),
                      _age(i.last_beat_age_s), str(i.active), "" if extra is None else str(extra), state)
    rates = snap.rates

    def rate(key: str) -> str:
        value = rates.get(key)
        return "n/a (first sample)" if value is None else f"{value:.2f}/s"

    jobs = Table(show_header=False, title="queue and rates")
    jobs.add_row("jobs stream length", str(snap.jobs_length))
    jobs.add_row("backlog (queued, not claimed)", str(snap.backlog))
    jobs.add_row("pending (claimed, not acked)", str(snap.pending))
    jobs.add_row("dead letters", f"[red]{snap.dead_letters}[/red]" if snap.dead_letters else "0")
    jobs.add_row("cancels", Text(rate("cancels_per_s") + by_label(rates.get("cancels_by_status"))))
    jobs.add_row("errors", Text(rate("errors_per_s") + by_label(rates.get("errors_by_code"))))
    if rates.get("unreachable"):
        jobs.add_row("metrics unreachable", Text(", ".join(rates["unreachable"])))
    return Group(table, jobs)


async def run(args: argparse.Namespace) -> int:
    r = aioredis.Redis.from_url(args.redis_url, decode_responses=True, socket_timeout=2.0)
    monitor = Monitor(r)
    try:
        if args.once:
            snap = await monitor.snapshot()
            if args.rate_window > 0:
                await asyncio.sleep(args.rate_window)
                snap = await monitor.snapshot()
            if args.json:
                print(json.dumps(snap.to_json(), indent=2))
            else:
                console = Console()
                (console if console.is_terminal else Console(width=160)).print(render(snap, args.redis_url))
            return 0
        console = Console()
        with Live(console=console, refresh_per_second=1, screen=False) as live:
            while True:
                try:
                    live.update(render(await monitor.snapshot(), args.redis_url))
                except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
                    live.update(Text(redact(f"Redis unreachable at {args.redis_url}: {exc}"), style="red"))
                await asyncio.sleep(args.interval)
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        print(redact(f"tokenrelay-monitor: Redis unreachable at {args.redis_url}: {exc}"), file=sys.stderr)
        return 2
    finally:
        await r.aclose()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tokenrelay-monitor", description="live view of gateways, workers and the job queue")
    parser.add_argument("--redis-url", default=default_redis_url(), help="default: $REDIS_URL, else the embedded Redis")
    parser.add_argument("--once", action="store_true", help="print one snapshot and exit")
    parser.add_argument("--json", action="store_true", help="with --once: print the snapshot as JSON")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    parser.add_argument("--rate-window", type=float, default=1.0,
                        help="with --once: seconds between the two metric scrapes behind the rates (0: no rates)")
    args = parser.parse_args(argv)
    try:
        sys.exit(asyncio.run(run(args)))
    except KeyboardInterrupt:
        sys.exit(0)
    except BrokenPipeError:  # `... | head`: the reader went away, nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)


if __name__ == "__main__":
    main()
