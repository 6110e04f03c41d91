"""The Redis client the gateway and worker use."""

from __future__ import annotations

import asyncio

from store.redis_store import connect


async def test_more_concurrent_calls_than_redis_py_default_pool_all_succeed(redis_url: str) -> None:
    """redis-py's default pool raises 'Too many connections' past 100 concurrent calls, which
    the gateway would report as Redis being down."""
    client = connect(redis_url)
    try:
        results = await asyncio.gather(*(client.blpop([f"t:empty:{i}"], timeout=0.3) for i in range(300)))
    finally:
        await client.aclose()
    assert results == [None] * 300
