"""A worker's pushed-cancel listener survives its connection: after Redis drops it, the
worker subscribes again, reads the cancel keys it may have missed, and takes pushes again."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from protocol.jobs import Job
from store import keys
from store.redis_store import Store, connect
from tests.support import t, wait_until, worker
from worker import metrics
from worker.engines.synthetic import SyntheticEngine
from worker.job import Running
from worker.runner import Worker


async def running_job(store: Store, w: Worker) -> tuple[str, Running]:
    """A long job, submitted and running on `w`."""
    mid = store.new_message_id("u")
    job = Job(message_id=mid, user="u", session_id=mid, text="hi", max_tokens=10_000, created_ms=0)
    assert (await store.submit(job)).outcome == "ok"
    await wait_until(lambda: mid in w.running)
    return mid, w.running[mid]


async def drop_subscribers_and_wait_for(admin: aioredis.Redis, channel: str) -> None:
    """Kill every pub/sub connection, then wait until `channel` has a subscriber again."""
    assert await admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub") >= 1

    async def subscribed() -> bool:
        counts = await admin.pubsub_numsub(channel)
        return bool(counts and counts[0][1] == 1)

    await wait_until(subscribed)


async def test_a_cancel_key_set_while_the_listener_was_down_is_caught_up(redis_url: str, store: Store) -> None:
    admin = connect(redis_url)
    try:
        async with worker(redis_url, [SyntheticEngine(rate=20.0)]) as w:
            mid, running = await running_job(store, w)
            cancelled = asyncio.Event()
            running.token.add_callback(lambda _token: cancelled.set())
            before = metrics.CANCEL_SIGNALS.labels("catch_up")._value.get()
            await admin.set(keys.cancel_key(mid), "user", ex=60)  # the key alone: no push, no store end
            await drop_subscribers_and_wait_for(admin, keys.cancel_channel(w.id))
            await asyncio.wait_for(cancelled.wait(), t(10))
            assert running.token.reason == "cancel"
            assert metrics.CANCEL_SIGNALS.labels("catch_up")._value.get() == before + 1
    finally:
        await admin.aclose()


async def test_pushes_reach_the_worker_again_after_its_connection_dropped(redis_url: str, store: Store) -> None:
    admin = connect(redis_url)
    try:
        async with worker(redis_url, [SyntheticEngine(rate=20.0)]) as w:
            mid, running = await running_job(store, w)
            await drop_subscribers_and_wait_for(admin, keys.cancel_channel(w.id))
            assert not running.token.cancelled
            cancelled = asyncio.Event()
            running.token.add_callback(lambda _token: cancelled.set())
            before = metrics.CANCEL_SIGNALS.labels("push")._value.get()
            await store.notify_worker(w.id, mid)  # the push alone: the key is not set
            await asyncio.wait_for(cancelled.wait(), t(5))
            assert metrics.CANCEL_SIGNALS.labels("push")._value.get() == before + 1
    finally:
        await admin.aclose()
