"""A cancel that arrives while the job is still queued: the model never runs.

Its own module, so no other cluster's workers share the jobs stream with it."""

from __future__ import annotations

from pathlib import Path

from tests.support import TERMINALS, ProcessCluster, client


async def test_cancel_while_queued_never_runs_the_model(redis_url: str, tmp_path: Path) -> None:
    cluster = ProcessCluster(redis_url, tmp_path)
    try:
        gw = cluster.add_gateway()
        cluster.add_worker("--engine", "synthetic", "--synthetic-rate", "20", "--concurrency", "1")
        await cluster.wait_healthy()
        name = "queue-user"
        async with client(gw.port or 0, name) as a:
            busy = await a.chat("busy", max_tokens=400)
            await a.wait_for(lambda f: f["type"] == "chunk" and f["message_id"] == busy)
            queued = await a.chat("queued", max_tokens=10)
            assert (await a.cancel(message_id=queued))["status"] == "cancelling"
            end = await a.terminal(queued, timeout=5)
            assert end == {"type": "cancelled", "message_id": queued, "seq": 0}
            assert a.chunks(queued) == []
            assert not any(f["type"] in TERMINALS for f in a.events(busy)), "the busy job still runs"
            await a.cancel(message_id=busy)
            await a.terminal(busy)
    finally:
        cluster.stop()
    log = "".join(p.log_path.read_text() for p in cluster.workers)
    assert queued not in log.replace(f'"message_id":"{queued}","source"', ""), "a worker touched the queued job"
