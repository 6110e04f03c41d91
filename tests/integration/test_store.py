"""The Redis client the gateway and worker use, and the worker's bounded chunk writer."""

from __future__ import annotations

import asyncio

from store.redis_store import Store, connect
from worker.writer import ChunkWriter


async def test_more_concurrent_calls_than_redis_py_default_pool_all_succeed(redis_url: str) -> None:
    """redis-py's default pool raises 'Too many connections' past 100 concurrent calls, which
    the gateway would report as Redis being down."""
    client = connect(redis_url)
    try:
        results = await asyncio.gather(*(client.blpop([f"t:empty:{i}"], timeout=0.3) for i in range(300)))
    finally:
        await client.aclose()
    assert results == [None] * 300


async def test_chunk_writer_is_bounded_and_frees_room_as_batches_leave(redis_url: str) -> None:
    store = Store(connect(redis_url))
    await store.load_append_script()
    writer = ChunkWriter(store, "w-bound", max_batch=2, max_pending=4)
    try:
        writes = [writer.append("m-unknown", 1, seq, "{}") for seq in range(1, 5)]
        assert writer.full
        waiting = asyncio.create_task(writer.room())
        await asyncio.sleep(0)
        assert not waiting.done(), "room() returned while the queue was at its bound"
        writer.start()
        await asyncio.wait_for(waiting, 5)
        assert await asyncio.gather(*writes) == ["not_ours"] * 4
        assert not writer.full
    finally:
        await writer.close()
        await store.close()
