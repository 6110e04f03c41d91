"""The batched engine behind a real worker, gateway and Redis: one engine serves the worker's
job slots together, and a Stop ends one chat while the others stream on unchanged."""

from __future__ import annotations

import pytest

from tests.support import assert_stream_ok, client, gateway, wait_until, worker
from worker.engines.batched import BatchedLlamaEngine

pytestmark = pytest.mark.llama

PROMPTS = ["tell me about the sea", "and about the mountains", "and the sky at night"]


async def test_three_chats_share_one_engine_and_a_stop_ends_only_its_own(redis_url: str) -> None:
    engine = BatchedLlamaEngine(n_seq=3, n_ctx=1024, temperature=0.0)
    async with gateway(redis_url) as gw, worker(redis_url, [engine] * 3), client(gw.port, "alice") as c:
        first = [await c.chat(f"first-{i}", text, max_tokens=1000) for i, text in enumerate(PROMPTS)]
        for mid in first:
            assert (await c.terminal(mid, timeout=60))["type"] == "done"
        assert max(len(step.decoded) for step in list(engine.steps)) == 3  # decoded together

        second = [await c.chat(f"second-{i}", text, max_tokens=1000) for i, text in enumerate(PROMPTS)]
        stopped = second[1]
        await c.wait_for(lambda f: f["type"] == "chunk" and f["message_id"] == stopped, timeout=60)
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
        partial = c.text(stopped)
        assert partial and c.text(first[1]).startswith(partial)
        history = await c.request(type="history", session_id="second-1")
        assert history["turns"][-1] == {"message_id": stopped, "role": "assistant", "text": partial, "status": "cancelled"}
        stats = engine.sequence_stats(stopped)
        assert stats is not None
        await wait_until(lambda: stats.released_at is not None, timeout=30)
        assert stats.finish == "cancelled" and stats.tokens_after_cancel <= 1
