"""The consumer reads jobs only into free slots, from every job stream in turn."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from store.redis_store import connect
from tests.support import wait_until
from worker.consume import Consumer, Entries

GROUP = "workers"


@pytest.fixture
async def r(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = connect(redis_url, timeout_s=10)
    try:
        yield client
    finally:
        await client.aclose()


class Slots:
    """A worker's slots as the consumer sees them: taken by every entry read."""

    def __init__(self, free: int) -> None:
        self.free = free
        self.read: list[tuple[str, bytes]] = []

    def on_entries(self, stream: str, entries: Entries) -> None:
        for entry_id, _fields in entries:
            self.read.append((stream, entry_id))
            self.free -= 1
            assert self.free >= 0, "read more jobs than free slots"


async def consuming(r: aioredis.Redis, streams: list[str], slots: Slots) -> tuple[Consumer, asyncio.Task[None]]:
    async def ensure_group(stream: str) -> None:
        await r.xgroup_create(stream, GROUP, id="0", mkstream=True)

    for stream in streams:
        await ensure_group(stream)
    consumer = Consumer(r, streams, GROUP, "w-1", free_slots=lambda: slots.free, on_entries=slots.on_entries,
                        ensure_group=ensure_group, block_ms=200)
    return consumer, asyncio.create_task(consumer.run())


@pytest.mark.parametrize("shards", [1, 3])
async def test_jobs_are_read_only_into_free_slots_from_every_stream(r: aioredis.Redis, shards: int) -> None:
    streams = [f"t:{{p{n}}}:jobs" for n in range(shards)]
    for n in range(6):
        await r.xadd(streams[n % shards], {"m": f"job-{n}"})
    slots = Slots(free=2)
    consumer, task = await consuming(r, streams, slots)
    try:
        await wait_until(lambda: len(slots.read) == 2)
        for _ in range(4):
            slots.free += 1  # a job ended
            consumer.slot_freed.set()
            read = len(slots.read)
            await wait_until(lambda: len(slots.read) == read + 1)
        assert slots.free == 0
        assert {stream for stream, _ in slots.read} == set(streams)
        pending = sum([(await r.xpending(s, GROUP))["pending"] for s in streams])
        assert pending == 6, "each read job is pending under the consumer, none lost"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_stream_without_its_group_gets_it_again(r: aioredis.Redis) -> None:
    streams = ["t:{p0}:jobs", "t:{p1}:jobs"]
    slots = Slots(free=4)
    consumer, task = await consuming(r, streams, slots)
    try:
        await r.delete(streams[1])  # the stream and its group are gone (a flushed Redis)
        await r.xadd(streams[1], {"m": "job"})

        async def group_back() -> bool:
            return any(g["name"] == GROUP.encode() for g in await r.xinfo_groups(streams[1]))

        await wait_until(group_back)
        await r.xadd(streams[1], {"m": "job-2"})
        await wait_until(lambda: any(s == streams[1] for s, _ in slots.read))
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
