"""The Redis client the gateway and worker use, and the worker's bounded chunk writer."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from store.redis_store import Store, connect
from tests.support import message_id
from worker.writer import ChunkWriter

UNKNOWN = message_id()
"""A message no store holds: every write of it is refused as not ours."""


async def test_more_concurrent_calls_than_redis_py_default_pool_all_succeed(redis_url: str) -> None:
    """redis-py's default pool raises 'Too many connections' past 100 concurrent calls, which
    the gateway would report as Redis being down. 150 calls, not more: each opens a connection
    within the client's 2 s connect timeout, and a storm of 300 on a loaded 2-core machine
    once took longer."""
    client = connect(redis_url)
    try:
        results = await asyncio.gather(*(client.blpop([f"t:empty:{i}"], timeout=0.5) for i in range(150)))
    finally:
        await client.aclose()
    assert results == [None] * 150


async def test_chunk_writer_is_bounded_and_frees_room_as_batches_leave(redis_url: str) -> None:
    store = Store(connect(redis_url))
    await store.load_append_script()
    writer = ChunkWriter(store, "w-bound", max_batch=2, max_pending=4)
    try:
        outcomes: dict[int, object] = {}
        all_answered = asyncio.get_running_loop().create_future()

        def written(seq: int, outcome: object) -> None:
            outcomes[seq] = outcome
            if len(outcomes) == 4:
                all_answered.set_result(None)

        for seq in range(1, 5):
            writer.append(UNKNOWN, 1, seq, "{}", written)
        assert writer.full
        waiting = asyncio.create_task(writer.room())
        await asyncio.sleep(0)
        assert not waiting.done(), "room() returned while the queue was at its bound"
        writer.start()
        await asyncio.wait_for(waiting, 5)
        await asyncio.wait_for(all_answered, 5)
        assert outcomes == {seq: "not_ours" for seq in range(1, 5)}
        assert not writer.full
    finally:
        await writer.close()
        await store.close()


async def test_chunk_writer_wakes_waiting_jobs_in_turn_even_when_one_gives_up(redis_url: str) -> None:
    """Jobs wait for room first come, first served; one cancelled while waiting does not keep
    the others waiting once the queue drains."""
    store = Store(connect(redis_url))
    await store.load_append_script()
    writer = ChunkWriter(store, "w-turns", max_batch=1, max_pending=2)
    answered: list[int] = []
    try:
        for seq in (1, 2):
            writer.append(UNKNOWN, 1, seq, "{}", lambda seq, _outcome: answered.append(seq))
        woken: list[int] = []

        async def job(index: int) -> None:
            await writer.room()
            woken.append(index)

        jobs = [asyncio.create_task(job(i)) for i in range(5)]
        await asyncio.sleep(0)
        assert woken == []
        jobs[1].cancel()
        writer.start()
        await asyncio.wait_for(asyncio.gather(*jobs[:1], *jobs[2:]), 5)
        assert woken == [0, 2, 3, 4]
        assert jobs[1].cancelled()
        assert answered == [1, 2]
    finally:
        await writer.close()
        await store.close()


async def test_chunk_writer_paces_batches_while_busy_and_sends_the_first_after_a_quiet_spell_at_once(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With `pace_s`, a chunk that comes to an idle writer leaves at once; chunks that come
    within `pace_s` of the latest batch wait and leave together, unless a full batch waits."""
    store = Store(connect(redis_url))
    await store.load_append_script()
    batches: list[list[int]] = []
    execute = store.lean.execute

    async def recording(commands: Any) -> list[Any]:
        batches.append([int(c[7]) for c in commands])  # the seq argument of each APPEND
        return await execute(commands)

    monkeypatch.setattr(store.lean, "execute", recording)
    writer = ChunkWriter(store, "w-pace", max_batch=4, pace_s=0.5)
    answered: list[int] = []
    answers = {n: asyncio.Event() for n in (1, 5, 9)}

    def written(seq: int, _outcome: object) -> None:
        answered.append(seq)
        if seq in answers:
            answers[seq].set()

    try:
        writer.start()
        writer.append(UNKNOWN, 1, 1, "{}", written)
        await asyncio.wait_for(answers[1].wait(), 5)
        for seq in range(2, 6):  # within pace_s of batch [1]: they wait, then leave together
            writer.append(UNKNOWN, 1, seq, "{}", written)
            for _ in range(5):
                await asyncio.sleep(0)  # the writer's turn, were it not pacing
        assert answered == [1]
        await asyncio.wait_for(answers[5].wait(), 5)
        for seq in range(6, 10):  # a full batch (max_batch 4) does not wait
            writer.append(UNKNOWN, 1, seq, "{}", written)
        await asyncio.wait_for(answers[9].wait(), 5)
    finally:
        await writer.close()
        await store.close()
    assert batches == [[1], [2, 3, 4, 5], [6, 7, 8, 9]]
