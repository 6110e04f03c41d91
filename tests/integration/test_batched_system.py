"""The batched engine behind a real worker, gateway and Redis: one engine serves the worker's
job slots together, a job is read from the stream only when a slot is free, and a Stop ends one
chat while the others stream on unchanged."""

from __future__ import annotations

import pytest

from store import keys
from tests.support import LLAMA_THREADS, assert_stream_ok, client, gateway, wait_until, worker
from worker.engines.batched import BatchedLlamaEngine

pytestmark = pytest.mark.llama

PROMPTS = ["tell me about the sea", "and about the mountains", "and the sky at night"]


async def test_three_chats_share_one_engine_and_a_stop_ends_only_its_own(redis_url: str) -> None:
    engine = BatchedLlamaEngine(n_seq=3, n_ctx=1024, temperature=0.0, n_threads=LLAMA_THREADS)
    async with gateway(redis_url) as gw, worker(redis_url, [engine] * 3) as w, client(gw.port, "alice") as c:
        first = [await c.chat(f"first-{i}", text, max_tokens=1000) for i, text in enumerate(PROMPTS)]
        for mid in first:
            assert (await c.terminal(mid, timeout=60))["type"] == "done"
        assert max(len(step.decoded) for step in list(engine.steps)) == 3  # decoded together

        second = [await c.chat(f"second-{i}", text, max_tokens=1000) for i, text in enumerate(PROMPTS)]
        stopped = second[1]
        for mid in second:
            await c.wait_for(lambda f, mid=mid: f["type"] == "chunk" and f["message_id"] == mid, timeout=60)
        waiting = await c.chat("waiting", PROMPTS[0], max_tokens=1000)  # every slot is taken
        steps = engine.step_count
        await wait_until(lambda: engine.step_count >= steps + 10, timeout=60)
        streams = w.store.keyspace.job_streams()
        assert sum([(await w.store.redis.xpending(s, keys.WORKER_GROUP))["pending"] for s in streams]) == 3
        assert waiting not in w.running and engine.sequence_stats(waiting) is None, "left in the stream"
        result = await c.cancel(message_id=stopped)
        assert result == {"type": "cancel_result", "status": "cancelling", "message_id": stopped}
        end = await c.terminal(stopped, timeout=60)
        assert end["type"] == "cancelled"
        assert_stream_ok(c, stopped)
        for mid, before in zip([second[0], second[2]], [first[0], first[2]]):
            done = await c.terminal(mid, timeout=60)
            assert done["type"] == "done"
            assert_stream_ok(c, mid)
            assert c.text(mid) == c.text(before)  # greedy: the neighbour's Stop changed nothing
        assert (await c.terminal(waiting, timeout=60))["type"] == "done"  # it took the freed slot
        assert c.text(waiting) == c.text(first[0])
        partial = c.text(stopped)
        assert partial and c.text(first[1]).startswith(partial)
        history = await c.request(type="history", session_id="second-1")
        assert history["turns"][-1] == {"message_id": stopped, "role": "assistant", "text": partial, "status": "cancelled"}
        stats = engine.sequence_stats(stopped)
        assert stats is not None
        await wait_until(lambda: stats.released_at is not None, timeout=30)
        assert stats.finish == "cancelled" and stats.tokens_after_cancel <= 1
