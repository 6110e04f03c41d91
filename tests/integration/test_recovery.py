"""Jobs nobody runs any more are found and ended; the admission backlog cannot drift.

Real Redis, real workers (in-process, synthetic engine); the odd states are made from outside,
the way crashes and expiry leave them.
"""

from __future__ import annotations

import time


from protocol.jobs import Job
from protocol.messages import Chunk, Done, encode_text
from store import keys
from store.redis_store import Store, connect
from store.settings import Lifetimes
from tests.support import BACKLOG, JOBS_STREAM, KEYSPACE, message_id, wait_until, worker
from worker.engines.synthetic import SyntheticEngine
from worker.runner import Worker


def new_job(n: int, max_tokens: int = 3, user: str = "u") -> Job:
    mid = message_id(user)
    return Job(message_id=mid, user=user, session_id=mid, text="hi", max_tokens=max_tokens,
               created_ms=int(time.time() * 1000))


async def submitted(store: Store, count: int, max_tokens: int = 3) -> list[str]:
    mids = []
    for n in range(count):
        job = new_job(n, max_tokens)
        assert (await store.submit(job)).outcome == "ok"
        mids.append(job.message_id)
    return mids


async def ended(store: Store, mids: list[str]) -> bool:
    states = [await store.message_owner(mid) for mid in mids]
    return all(s is not None and s[1] in ("done", "cancelled", "error") for s in states)


async def read_as(store: Store, consumer: str, count: int) -> None:
    """Deliver `count` new entries of the jobs stream to `consumer` (a worker that then died)."""
    groups = await store.redis.xinfo_groups(JOBS_STREAM)
    if not groups:
        await store.redis.xgroup_create(JOBS_STREAM, keys.WORKER_GROUP, id="0")
    reply = await store.redis.xreadgroup(keys.WORKER_GROUP, consumer, {JOBS_STREAM: ">"}, count=count)
    assert len(reply[0][1]) == count


async def test_a_queued_message_that_expired_leaves_the_backlog_when_a_worker_reads_it(
    redis_url: str, store: Store
) -> None:
    (mid,) = await submitted(store, 1)
    assert await store.redis.zcard(BACKLOG) == 1
    await store.redis.delete(keys.meta(mid))  # its lifetime ran out before any worker came
    async with worker(redis_url):
        async def backlog_empty() -> bool:
            return await store.redis.zcard(BACKLOG) == 0

        await wait_until(backlog_empty)
        pending = await store.redis.xpending(JOBS_STREAM, keys.WORKER_GROUP)
        assert pending["pending"] == 0, "the entry was acknowledged"


async def test_ids_older_than_a_message_lifetime_do_not_count_against_admission(redis_url: str) -> None:
    store = Store(connect(redis_url), Lifetimes(backlog_limit=2))
    try:
        (stale,) = await submitted(store, 1)
        await store.redis.zadd(BACKLOG, {stale: 0})  # accepted an hour and more ago
        await store.redis.zadd(BACKLOG, {message_id(): 1})
        assert await store.redis.zcard(BACKLOG) == 2
        fresh = await submitted(store, 2)
        assert set(await store.redis.zrange(BACKLOG, 0, -1)) == {m.encode() for m in fresh}
        assert (await store.submit(new_job(9))).outcome == "overloaded"
    finally:
        await store.close()


async def test_every_pending_entry_of_a_dead_worker_is_recovered_behind_a_busy_live_one(
    redis_url: str, store: Store
) -> None:
    """A live worker holds 250 pending entries, older than the 5 of a dead one: the reaper
    pages each dead consumer's entries, so it does not stop at the group's oldest 200."""
    await submitted(store, 250)
    await read_as(store, "w-busy", 250)
    await store.redis.set(keys.alive("w-busy"), "1", ex=600)  # beating, busy with long jobs
    dead = await submitted(store, 5)
    await read_as(store, "w-dead", 5)
    async with worker(redis_url):

        async def recovered() -> bool:
            return await ended(store, dead)

        await wait_until(recovered, timeout=15)
    pending = await store.redis.xpending(JOBS_STREAM, keys.WORKER_GROUP)
    assert {c["name"]: c["pending"] for c in pending["consumers"]} == {b"w-busy": 250}


async def busy(store: Store, w: Worker) -> str:
    """Start a job that keeps the worker's only slot busy for a while (its consume loop then
    reads nothing, so the entries below are only read by the test)."""
    (mid,) = await submitted(store, 1, max_tokens=300)
    await wait_until(lambda: mid in w.running)
    return mid


async def test_a_job_the_worker_holds_but_does_not_run_is_run_anyway(redis_url: str, store: Store) -> None:
    """An entry pending under a live worker that no task of it handles (as an unexpected
    failure would leave it) is found by that worker's reaper and run to its end."""
    async with worker(redis_url, [SyntheticEngine(rate=200.0)]) as w:
        first = await busy(store, w)
        (forgotten,) = await submitted(store, 1, max_tokens=2)
        await store.redis.xreadgroup(keys.WORKER_GROUP, w.id, {JOBS_STREAM: ">"}, count=1)
        await wait_until(lambda: ended(store, [first, forgotten]), timeout=15)
        frames = await store.read_log(forgotten, 0)
        assert b'"type":"done"' in frames[-1], frames
        assert len(frames) == 3


async def test_a_running_job_of_a_live_worker_it_forgot_ends_worker_lost(redis_url: str, store: Store) -> None:
    """The meta says running under this worker, chunks were streamed, but no task runs it."""
    async with worker(redis_url, [SyntheticEngine(rate=200.0)]) as w:
        await busy(store, w)
        job = new_job(7, max_tokens=50)
        assert (await store.submit(job)).outcome == "ok"
        await store.redis.xreadgroup(keys.WORKER_GROUP, w.id, {JOBS_STREAM: ">"}, count=1)
        # what a task that died mid-stream leaves: claimed by this worker, one chunk stored
        claimed = await store.claim(job.message_id, w.id, 0)
        assert claimed is not None
        chunk = encode_text(Chunk(message_id=job.message_id, seq=1, text="partial "))
        (reply,) = await store.lean.execute([store.append_command(job.message_id, w.id, claimed[0], 1, chunk)])
        assert reply == 1
        await wait_until(lambda: ended(store, [job.message_id]), timeout=15)
        last = (await store.read_log(job.message_id, 0))[-1]
        assert b'"code":"worker_lost"' in last and b'"seq":1' in last, last


async def test_every_script_answers_a_repeated_call_as_the_first(store: Store) -> None:
    """A call whose reply was lost with its connection is sent again (store.lean): the second
    run of each script must change nothing and answer the same."""
    job = new_job(1)
    assert (await store.submit(job)).outcome == "ok"
    assert await store.submit(job) == (await store.submit(job))
    assert (await store.submit(job)).outcome == "dup"
    assert await store.redis.llen(KEYSPACE.history("u", job.session_id)) == 1, "one user turn"
    assert await store.redis.xlen(JOBS_STREAM) == 1, "one job"
    first = await store.claim(job.message_id, "w-1", 0)
    assert first is not None and await store.claim(job.message_id, "w-1", 0) == first
    assert await store.claim(job.message_id, "w-2", 0) is None, "another worker still gets nothing"
    taken = await store.takeover(job.message_id, "w-1", "w-3")
    assert taken is not None and await store.takeover(job.message_id, "w-1", "w-3") == taken
    done = Done(message_id=job.message_id, seq=0, finish_reason="length")
    for _ in range(2):
        assert await store.finish(job.message_id, "w-3", taken[0], done, "", user="u", session_id=job.session_id) == "ended"
    assert len(await store.read_log(job.message_id, 0)) == 1, "one terminal"
