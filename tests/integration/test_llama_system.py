"""The real llama engine on the built-in model, through gateway and Redis."""

from __future__ import annotations

import pytest

from tests.support import assert_stream_ok, client, gateway, worker
from worker.engines.llama import LlamaEngine

pytestmark = pytest.mark.llama


def llama() -> list[LlamaEngine]:
    return [LlamaEngine(n_ctx=1024)]


async def test_answer_streams_printable_words_and_ends_done(redis_url: str) -> None:
    async with gateway(redis_url) as gw, worker(redis_url, llama()), client(gw.port, "alice") as c:
        mid = await c.chat("s1", "tell me something", max_tokens=60)
        done = await c.terminal(mid, timeout=60)
        assert done["type"] == "done" and done["finish_reason"] in ("stop", "length")
        assert_stream_ok(c, mid)
        text = c.text(mid)
        words = text.split()
        assert words and all(w.isprintable() and w.isalpha() for w in words), text
        assert len(words) <= 60
        if done["finish_reason"] == "length":
            assert len(c.chunks(mid)) >= 1
        history = await c.request(type="history", session_id="s1")
        assert history["turns"][-1] == {"message_id": mid, "role": "assistant", "text": text, "status": "complete"}


async def test_max_tokens_is_honoured(redis_url: str) -> None:
    async with gateway(redis_url) as gw, worker(redis_url, llama()), client(gw.port, "alice") as c:
        for n in (1, 5, 17):
            mid = await c.chat(f"s{n}", "count", max_tokens=n)
            done = await c.terminal(mid, timeout=60)
            assert done["type"] == "done"
            assert 0 < len(c.text(mid).split()) <= n
            if done["finish_reason"] == "length":
                assert len(c.text(mid).split()) >= 1


async def test_second_turn_uses_history_and_streams(redis_url: str) -> None:
    async with gateway(redis_url) as gw, worker(redis_url, llama()), client(gw.port, "alice") as c:
        first = await c.chat("s1", "first", max_tokens=10)
        await c.terminal(first, timeout=60)
        second = await c.chat("s1", "second", max_tokens=10)
        assert (await c.terminal(second, timeout=60))["type"] == "done"
        assert_stream_ok(c, second)


async def test_cancel_mid_generation_keeps_partial_text_in_history(redis_url: str) -> None:
    async with gateway(redis_url) as gw, worker(redis_url, llama()), client(gw.port, "alice") as c:
        mid = await c.chat("s1", "a long story please", max_tokens=2048)
        await c.wait_for(lambda f: f["type"] == "chunk" and f["message_id"] == mid, timeout=60)
        result = await c.request(type="cancel", message_id=mid)
        assert result == {"type": "cancel_result", "status": "cancelling", "message_id": mid}
        end = await c.terminal(mid, timeout=60)
        if end["type"] == "done":
            pytest.skip("the built-in model reached end-of-generation before the cancel")
        assert end["type"] == "cancelled"
        assert_stream_ok(c, mid)
        partial = c.text(mid)
        assert partial and len(partial.split()) < 2048
        history = await c.request(type="history", session_id="s1")
        assert history["turns"][-1] == {"message_id": mid, "role": "assistant", "text": partial, "status": "cancelled"}


async def test_heartbeats_are_answered_between_chunks_while_llama_generates(redis_url: str) -> None:
    async with gateway(redis_url) as gw, worker(redis_url, llama()), client(gw.port, "alice") as c:
        mid = await c.chat("s1", "go on", max_tokens=2048)
        await c.wait_for(lambda f: f["type"] == "chunk" and f["message_id"] == mid, timeout=60)
        acks = []
        for i in range(5):
            ack = await c.request(type="heartbeat", ts=float(i))
            assert ack["type"] == "heartbeat_ack" and ack["ts"] == float(i)
            acks.append(c.frames.index(ack))
        # The next frame of the message after the acks: a chunk shows generation went on.
        after = await c.wait_for(lambda f: f.get("message_id") == mid, start=acks[-1] + 1, timeout=60)
        await c.send(type="cancel", message_id=mid)
        await c.terminal(mid, timeout=60)
        if after["type"] == "done":
            pytest.skip("the built-in model reached end-of-generation during the heartbeats")
        chunk_positions = [i for i, f in enumerate(c.frames) if f["type"] == "chunk" and f["message_id"] == mid]
        assert chunk_positions[0] < acks[0] < chunk_positions[-1], (
            "heartbeat acks must arrive between the chunks of a running generation"
        )
        assert_stream_ok(c, mid)
