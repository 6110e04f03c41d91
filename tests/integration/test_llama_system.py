"""The real llama engine on the built-in model, through gateway and Redis.

The model is built with EOS impossible (`tests.models.ENDLESS`), so an answer ends at its
length limit or by a cancel, never early by chance: a cancel sent after the first chunk always
meets a running generation (the limit is thousands of tokens away)."""

from __future__ import annotations

import json

import pytest

from protocol.validation import Limits
from tests.models import endless_model  # noqa: F401  (fixture)
from tests.support import assert_stream_ok, client, gateway, http_get, wait_until, worker
from worker.engines.llama import LlamaEngine
from worker.model.choice import ModelFile

pytestmark = pytest.mark.llama

LONG = 8192
"""Context and max_tokens for answers that must still run when the test acts on them."""


def llama(model: ModelFile, n_ctx: int = 1024) -> list[LlamaEngine]:
    return [LlamaEngine(model, n_ctx=n_ctx)]


async def test_answer_streams_printable_words_and_ends_done(redis_url: str, endless_model: ModelFile) -> None:
    async with gateway(redis_url) as gw, worker(redis_url, llama(endless_model)), client(gw.port, "alice") as c:
        mid = await c.chat("s1", "tell me something", max_tokens=60)
        done = await c.terminal(mid, timeout=60)
        assert done["type"] == "done" and done["finish_reason"] == "length"
        assert_stream_ok(c, mid)
        text = c.text(mid)
        words = text.split()
        assert words and all(w.isprintable() and w.isalpha() for w in words), text
        assert len(words) <= 60
        history = await c.request(type="history", session_id="s1")
        assert history["turns"][-1] == {"message_id": mid, "role": "assistant", "text": text, "status": "complete"}


async def test_max_tokens_is_honoured(redis_url: str, endless_model: ModelFile) -> None:
    async with gateway(redis_url) as gw, worker(redis_url, llama(endless_model)), client(gw.port, "alice") as c:
        for n in (1, 5, 17):
            mid = await c.chat(f"s{n}", "count", max_tokens=n)
            done = await c.terminal(mid, timeout=60)
            assert done["type"] == "done" and done["finish_reason"] == "length"
            assert 1 <= len(c.text(mid).split()) <= n


async def test_second_turn_uses_history_and_streams(redis_url: str, endless_model: ModelFile) -> None:
    async with gateway(redis_url) as gw, worker(redis_url, llama(endless_model)), client(gw.port, "alice") as c:
        first = await c.chat("s1", "first", max_tokens=10)
        await c.terminal(first, timeout=60)
        second = await c.chat("s1", "second", max_tokens=10)
        assert (await c.terminal(second, timeout=60))["type"] == "done"
        assert_stream_ok(c, second)


async def test_cancel_mid_generation_keeps_partial_text_in_history(redis_url: str, endless_model: ModelFile) -> None:
    limits = Limits(max_tokens=LONG)
    async with (
        gateway(redis_url, limits=limits) as gw,
        worker(redis_url, llama(endless_model, LONG)),
        client(gw.port, "alice") as c,
    ):
        mid = await c.chat("s1", "a long story please", max_tokens=LONG)
        await c.wait_for(lambda f: f["type"] == "chunk" and f["message_id"] == mid, timeout=60)
        result = await c.request(type="cancel", message_id=mid)
        assert result == {"type": "cancel_result", "status": "cancelling", "message_id": mid}
        end = await c.terminal(mid, timeout=60)
        assert end["type"] == "cancelled"
        assert_stream_ok(c, mid)
        partial = c.text(mid)
        assert partial and len(partial.split()) < LONG
        history = await c.request(type="history", session_id="s1")
        assert history["turns"][-1] == {"message_id": mid, "role": "assistant", "text": partial, "status": "cancelled"}


async def test_heartbeats_are_answered_between_chunks_while_llama_generates(
    redis_url: str, endless_model: ModelFile
) -> None:
    limits = Limits(max_tokens=LONG)
    async with (
        gateway(redis_url, limits=limits) as gw,
        worker(redis_url, llama(endless_model, LONG)),
        client(gw.port, "alice") as c,
    ):
        mid = await c.chat("s1", "go on", max_tokens=LONG)
        await c.wait_for(lambda f: f["type"] == "chunk" and f["message_id"] == mid, timeout=60)
        acks = []
        for i in range(5):
            ack = await c.request(type="heartbeat", ts=float(i))
            assert ack["type"] == "heartbeat_ack" and ack["ts"] == float(i)
            acks.append(c.frames.index(ack))
        # The next frame of the message after the acks: a chunk shows generation went on.
        after = await c.wait_for(lambda f: f.get("message_id") == mid, start=acks[-1] + 1, timeout=60)
        await c.send(type="cancel", message_id=mid)
        assert (await c.terminal(mid, timeout=60))["type"] == "cancelled"
        assert after["type"] == "chunk"
        chunk_positions = [i for i, f in enumerate(c.frames) if f["type"] == "chunk" and f["message_id"] == mid]
        assert chunk_positions[0] < acks[0] < chunk_positions[-1], (
            "heartbeat acks must arrive between the chunks of a running generation"
        )
        assert_stream_ok(c, mid)


async def test_temperature_zero_and_a_seed_repeat_the_answer_across_sessions(
    redis_url: str, endless_model: ModelFile
) -> None:
    async with gateway(redis_url) as gw, worker(redis_url, llama(endless_model)), client(gw.port, "alice") as c:
        texts: dict[str, list[str]] = {}
        for run in range(2):
            for name, sampling in (("greedy", {"temperature": 0}), ("seeded", {"temperature": 1.2, "seed": 5})):
                mid = await c.chat(f"{name}-{run}", "same question", max_tokens=30, **sampling)
                assert (await c.terminal(mid, timeout=60))["type"] == "done"
                texts.setdefault(name, []).append(c.text(mid))
        assert texts["greedy"][0] == texts["greedy"][1] and texts["greedy"][0]
        assert texts["seeded"][0] == texts["seeded"][1] and texts["seeded"][0] != texts["greedy"][0]


async def test_a_text_too_long_for_the_context_ends_with_bad_request(redis_url: str, endless_model: ModelFile) -> None:
    async with gateway(redis_url) as gw, worker(redis_url, llama(endless_model, 256)), client(gw.port, "alice") as c:
        mid = await c.chat("s1", "word " * 400, max_tokens=10)
        end = await c.terminal(mid, timeout=60)
        assert end["type"] == "error" and end["code"] == "bad_request" and end["seq"] == 0, end
        assert "too long for the model" in end["message"]
        mid = await c.chat("s1", "short", max_tokens=3)  # the worker and the session go on
        assert (await c.terminal(mid, timeout=60))["type"] == "done"


async def test_info_lists_the_models_of_live_workers(redis_url: str, endless_model: ModelFile) -> None:
    async with gateway(redis_url) as gw:
        status, body = await http_get(gw.port, "/info")
        assert (status, json.loads(body)) == (200, {"models": [], "redis": True})
        async with worker(redis_url, llama(endless_model)), worker(redis_url, llama(endless_model)):

            async def both_listed() -> bool:
                return json.loads((await http_get(gw.port, "/info"))[1])["models"] == [
                    {"name": "endless", "workers": 2}
                ]

            await wait_until(both_listed, timeout=20)
