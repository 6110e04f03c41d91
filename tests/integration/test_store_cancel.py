"""A cancel ends a running message in the store at once; the worker's late writes are refused.

Drives `store.Store` (the interface the gateway and the worker share) against real Redis, one
step at a time, so each interleaving of cancel, chunk and finish is exact.
"""

from __future__ import annotations

import asyncio

import msgspec

from protocol.jobs import Job
from protocol.messages import Cancelled, Chunk, Done, HistoryTurn, encode_text
from store import keys
from tests.support import KEYSPACE
from store.redis_store import APPEND_RESULTS, Append, Store, connect

WORKER = "w-test"


async def running_message(store: Store, user: str = "u", session: str = "s") -> tuple[str, int]:
    """A submitted and claimed message: (message_id, attempt)."""
    mid = store.new_message_id(user)
    job = Job(message_id=mid, user=user, session_id=session, text="hi", max_tokens=50, created_ms=0)
    assert (await store.submit(job)).outcome == "ok"
    claimed = await store.claim(mid, WORKER, 0)
    assert claimed is not None and claimed[1] == job
    return mid, claimed[0]


async def append(store: Store, mid: str, attempt: int, seq: int, text: str) -> Append:
    frame = encode_text(Chunk(message_id=mid, seq=seq, text=text))
    (result,) = await store.lean.execute([store.append_command(mid, WORKER, attempt, seq, frame)])
    return APPEND_RESULTS[int(result)]


async def log_frames(store: Store, mid: str) -> list[dict[str, object]]:
    return [msgspec.json.decode(f) for f in await store.read_log(mid, 0)]


async def finish_done(store: Store, mid: str, attempt: int, seq: int, text: str) -> str:
    owner = await store.message_owner(mid)
    assert owner is not None
    done = Done(message_id=mid, seq=seq, finish_reason="length")
    return await store.finish(mid, WORKER, attempt, done, text, user=owner.user, session_id=owner.session_id)


async def test_cancel_of_a_running_message_ends_it_at_its_last_stored_seq(store: Store) -> None:
    mid, attempt = await running_message(store)
    live = store.redis.pubsub()
    await live.subscribe(keys.live_channel(mid), keys.cancel_channel(WORKER))
    try:
        assert await append(store, mid, attempt, 1, "one ") == "written"
        assert await append(store, mid, attempt, 2, "two ") == "written"
        assert await store.cancel(mid, "u", "user") == ("cancelling", WORKER)
        await store.notify_worker(WORKER, mid)

        frames = await log_frames(store, mid)
        assert frames[-1] == {"type": "cancelled", "message_id": mid, "seq": 2}
        assert [f["seq"] for f in frames] == [1, 2, 2]
        assert await store.message_owner(mid) == ("u", "cancelled", "s")
        assert await store.redis.get(keys.grace_record(mid)) == b"cancelled"
        assert await store.redis.exists(keys.cancel_key(mid)), "the key still stops the worker"

        pushed: dict[str, bytes] = {}
        async with asyncio.timeout(5):
            while len(pushed) < 2:
                message = await live.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if message is not None:
                    pushed[message["channel"].decode()] = message["data"]
        assert msgspec.json.decode(pushed[keys.live_channel(mid)]) == frames[-1]
        assert pushed[keys.cancel_channel(WORKER)] == mid.encode()
    finally:
        await live.aclose()  # type: ignore[no-untyped-call]

    # The worker has not heard yet: its next chunk is refused and says why.
    assert await append(store, mid, attempt, 3, "three ") == "cancelled"
    assert [f["seq"] for f in await log_frames(store, mid)] == [1, 2, 2]
    # History already shows the partial text, from the log, before the worker saves it.
    assert [(t.role, t.text, t.status) for t in await store.history("u", "s")][-1] == (
        "assistant", "one two ", "cancelled",
    )
    # The worker's own end only saves the text the client saw; no second terminal.
    assert await finish_done(store, mid, attempt, 3, "one two ") == "cancelled_before"
    assert [f["type"] for f in await log_frames(store, mid)] == ["chunk", "chunk", "cancelled"]
    answer = await store.redis.hget(KEYSPACE.answers("u", "s"), mid)
    assert answer is not None and msgspec.json.decode(answer) == {"text": "one two ", "status": "cancelled"}
    assert not await store.redis.exists(keys.cancel_key(mid))
    # Duplicate clicks: already cancelled, never an error, never a second terminal.
    assert await store.cancel(mid, "u", "user") == ("already_cancelled", "")
    assert len(await log_frames(store, mid)) == 3


async def test_cancel_before_the_first_chunk_ends_at_seq_zero(store: Store) -> None:
    mid, attempt = await running_message(store)
    assert await store.cancel(mid, "u", "user") == ("cancelling", WORKER)
    assert await log_frames(store, mid) == [{"type": "cancelled", "message_id": mid, "seq": 0}]
    assert await append(store, mid, attempt, 1, "late ") == "cancelled"
    assert await finish_done(store, mid, attempt, 1, "") == "cancelled_before"


async def test_finish_that_lands_first_wins_and_the_late_cancel_is_already_completed(store: Store) -> None:
    mid, attempt = await running_message(store)
    assert await append(store, mid, attempt, 1, "a ") == "written"
    assert await finish_done(store, mid, attempt, 1, "a ") == "ended"
    assert await store.cancel(mid, "u", "user") == ("already_completed", "")
    assert [f["type"] for f in await log_frames(store, mid)] == ["chunk", "done"]


async def test_a_resent_chunk_is_answered_written_and_stored_once(store: Store) -> None:
    """A worker resends its whole batch when the connection dropped before the replies."""
    mid, attempt = await running_message(store)
    assert await append(store, mid, attempt, 1, "a ") == "written"
    assert await append(store, mid, attempt, 2, "b ") == "written"
    assert await append(store, mid, attempt, 1, "a ") == "written"
    assert await append(store, mid, attempt, 2, "b ") == "written"
    assert await append(store, mid, attempt, 3, "c ") == "written"
    assert [f["seq"] for f in await log_frames(store, mid)] == [1, 2, 3]


async def test_another_users_cancel_touches_nothing(store: Store) -> None:
    mid, attempt = await running_message(store, user="owner")
    assert await store.cancel(mid, "intruder", "user") == ("not_found", "")
    assert await store.message_owner(mid) == ("owner", "running", "s")
    assert await append(store, mid, attempt, 1, "still ") == "written"


async def test_a_worker_that_lost_the_job_is_told_not_ours_not_cancelled(store: Store) -> None:
    mid, attempt = await running_message(store)
    assert await store.takeover(mid, WORKER, "w-other") is not None
    assert await append(store, mid, attempt, 1, "stale ") == "not_ours"
    assert await store.cancel(mid, "u", "user") == ("cancelling", "w-other")
    assert await append(store, mid, attempt, 1, "stale ") == "not_ours"
    assert await finish_done(store, mid, attempt, 1, "stale ") == "not_ours"


async def test_text_of_a_message_cancelled_while_its_worker_was_dead_is_saved_once(store: Store) -> None:
    mid, attempt = await running_message(store)
    assert await append(store, mid, attempt, 1, "kept ") == "written"
    assert await store.cancel(mid, "u", "user") == ("cancelling", WORKER)
    await store.save_cancelled_answer(mid, await store.partial_text(mid), "u", "s")
    await store.save_cancelled_answer(mid, "something else", "u", "s")
    answer = await store.redis.hget(KEYSPACE.answers("u", "s"), mid)
    assert answer is not None and msgspec.json.decode(answer) == {"text": "kept ", "status": "cancelled"}


async def test_polling_baseline_only_sets_the_key_and_the_worker_ends_the_message(redis_url: str) -> None:
    store = Store(connect(redis_url), cancel_ends=False)
    try:
        await store.load_append_script()
        mid, attempt = await running_message(store)
        assert await append(store, mid, attempt, 1, "a ") == "written"
        assert await store.cancel(mid, "u", "user") == ("cancelling", WORKER)
        assert await store.message_owner(mid) == ("u", "running", "s")
        assert await store.redis.exists(keys.cancel_key(mid))
        assert await append(store, mid, attempt, 2, "b ") == "written"
        # The worker ends it on its own (the Stop raced the last token): cancelled, same seq.
        assert await finish_done(store, mid, attempt, 2, "a b ") == "ended_cancelled"
        frames = await log_frames(store, mid)
        assert frames[-1] == msgspec.json.decode(encode_text(Cancelled(message_id=mid, seq=2)))
    finally:
        await store.close()


async def test_session_turns_are_those_of_earlier_messages_only(store: Store) -> None:
    """The worker's prompt history: one round trip, nothing of the message being generated."""
    first, attempt = await running_message(store, session="hist")
    assert await append(store, first, attempt, 1, "one ") == "written"
    assert await finish_done(store, first, attempt, 1, "one ") == "ended"
    stopped, attempt = await running_message(store, session="hist")
    assert await append(store, stopped, attempt, 1, "par") == "written"
    assert (await store.cancel(stopped, "u", "user"))[0] == "cancelling"
    await store.finish(stopped, WORKER, attempt, Cancelled(message_id=stopped, seq=1), "par", user="u", session_id="hist")
    second, _ = await running_message(store, session="hist")
    assert await store.session_turns("u", "hist", before=second) == [
        HistoryTurn(first, "user", "hi", "complete"),
        HistoryTurn(first, "assistant", "one ", "complete"),
        HistoryTurn(stopped, "user", "hi", "complete"),
        HistoryTurn(stopped, "assistant", "par", "cancelled"),
    ]
    assert await store.session_turns("u", "hist", before=first) == []
    assert [(t.message_id, t.role) for t in await store.history("u", "hist")][4:] == [
        (second, "user"),
        (second, "assistant"),  # streaming, no text yet
    ]
