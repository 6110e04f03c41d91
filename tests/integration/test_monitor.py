"""The monitor: instances from their registry hashes, staleness, queue figures, rates."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from typing import Any

from clients.monitor import STALE_AFTER_S, parse_counters, to_instance
from store.embedded import free_port
from tests.support import REPO, ProcessCluster, t


async def snapshot(redis_url: str, *extra: str) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "clients.monitor", "--redis-url", redis_url, "--once", "--json", *extra,
        cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(t(20)):
        out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    data: dict[str, Any] = json.loads(out)
    return data


async def test_monitor_lists_instances_and_flags_a_killed_worker(process_cluster: ProcessCluster) -> None:
    gw = process_cluster.add_gateway()
    wk = process_cluster.add_worker()
    await process_cluster.wait_healthy()
    assert wk.popen is not None

    snap = await snapshot(process_cluster.redis_url, "--rate-window", "0.2")
    by_kind = {i["kind"]: i for i in snap["instances"]}
    assert set(by_kind) == {"gateway", "worker"} and len(snap["instances"]) == 2
    assert by_kind["gateway"]["port"] == gw.port and by_kind["worker"]["pid"] == wk.popen.pid
    assert not by_kind["gateway"]["stale"] and not by_kind["worker"]["stale"]
    assert by_kind["worker"]["alive_key"] is True
    assert (snap["backlog"], snap["pending"], snap["dead_letters"]) == (0, 0, 0)
    assert snap["rates"]["gateways_measured"] == 1
    assert snap["rates"]["cancels_per_s"] == 0.0 and snap["rates"]["errors_per_s"] == 0.0

    wk.signal(signal.SIGKILL)
    async with asyncio.timeout(t(20)):
        while True:
            snap = await snapshot(process_cluster.redis_url, "--rate-window", "0")
            workers = [i for i in snap["instances"] if i["kind"] == "worker"]
            if not workers or workers[0]["stale"]:
                break
    gateways = [i for i in snap["instances"] if i["kind"] == "gateway"]
    assert len(gateways) == 1 and not gateways[0]["stale"]


def test_staleness_rules() -> None:
    now = time.time()
    fresh = {"kind": "worker", "id": "w1", "host": "h", "pid": "1", "started": str(now - 60), "last_beat": str(now - 1)}
    assert not to_instance(fresh, True, now).stale
    assert to_instance(fresh, False, now).stale_reason == "liveness key expired"
    old = dict(fresh, last_beat=str(now - STALE_AFTER_S - 1))
    assert to_instance(old, True, now).stale
    gateway = dict(fresh, kind="gateway", port="8000", streams="3")
    instance = to_instance(gateway, None, now)
    assert not instance.stale and instance.port == 8000 and instance.streams == 3


def test_counter_parsing() -> None:
    text = """# HELP tokenrelay_gateway_cancels_total Cancel requests, by outcome
# TYPE tokenrelay_gateway_cancels_total counter
tokenrelay_gateway_cancels_total{status="cancelling"} 4.0
tokenrelay_gateway_cancels_created{status="cancelling"} 1.7e9
tokenrelay_gateway_errors_total{code="bad_request"} 2.0
tokenrelay_gateway_frames_out_total 99.0
"""
    assert parse_counters(text) == {
        "tokenrelay_gateway_cancels_total": {"cancelling": 4.0},
        "tokenrelay_gateway_errors_total": {"bad_request": 2.0},
    }


def test_redact_hides_the_password_of_every_url() -> None:
    from clients.monitor import redact

    assert redact("redis://:s3cret@db:6379/0") == "redis://:***@db:6379/0"
    assert redact("rediss://app:p%40ss@db/1 and redis://x:y@z") == "rediss://app:***@db/1 and redis://x:***@z"
    assert redact("redis://db:6379/0") == "redis://db:6379/0"
    assert redact("unix:///tmp/r.sock") == "unix:///tmp/r.sock"


async def test_monitor_redacts_the_password_and_shows_strings_from_redis_as_text(
    own_redis: tuple[str, Any],
) -> None:
    import redis as sync_redis

    from store import keys

    url, admin = own_redis
    admin.hset(keys.instance("worker", "x"), mapping={
        "kind": "worker", "id": "[red]boom[/red]", "host": "[bold]host", "pid": "1",
        "started": str(time.time()), "last_beat": str(time.time()),
    })
    admin.config_set("requirepass", "pa55word")
    secret_url = url.replace("redis://", "redis://:pa55word@")
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "clients.monitor", "--redis-url", secret_url, "--once", "--rate-window", "0",
            cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "COLUMNS": "200"},
        )
        async with asyncio.timeout(t(20)):
            out, err = await proc.communicate()
        text = out.decode()
        assert proc.returncode == 0, err.decode()
        assert "[red]boom[/red]" in text and "[bold]host" in text, text
        assert "pa55word" not in text and ":***@" in text, text

        dead = f"redis://:pa55word@127.0.0.1:{free_port()}/0"
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "clients.monitor", "--redis-url", dead, "--once",
            cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        async with asyncio.timeout(t(20)):
            out, err = await proc.communicate()
        assert proc.returncode == 2 and "pa55word" not in (out + err).decode() and ":***@" in err.decode()
    finally:
        sync_redis.Redis.from_url(secret_url).config_set("requirepass", "")
