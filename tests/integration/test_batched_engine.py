"""The batched llama engine on real models: continuous admission, a Stop that ends only its own
sequence, chunked prefill between decode steps, per-request sampling, context limits.

The built-in model where language does not matter (its greedy answers do not end by
themselves); SmolLM2 where it does. Structure is asserted through the engine's step records
and per-sequence stats, never through wall time."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest

from worker.model.smollm2 import ensure_smollm2
from tests.support import LLAMA_THREADS, wait_until
from worker.cancel_token import CancelToken, Phase
from worker.engines.base import Finish, GenerationRequest, Turn
from worker import PromptTooLong
from worker.engines.batched import BatchedLlamaEngine, SequenceStats, Step
from worker.engines.llama import LlamaEngine

pytestmark = pytest.mark.llama

TIMEOUT = 60.0
QUESTIONS = [f"chat number {i}: " + " ".join(["ba no ki", "te lu ma", "so di fe", "ru ba te"][i % 4] for _ in range(i + 1))
             for i in range(8)]


@contextlib.asynccontextmanager
async def started(**options: Any) -> AsyncIterator[BatchedLlamaEngine]:
    options.setdefault("temperature", 0.0)
    options.setdefault("n_threads", LLAMA_THREADS)
    engine = BatchedLlamaEngine(**options)
    await engine.start()
    try:
        yield engine
    finally:
        await engine.close()


def request(mid: str, text: str, max_tokens: int, **extra: Any) -> GenerationRequest:
    return GenerationRequest(mid, text, max_tokens, **extra)


async def collect(
    engine: BatchedLlamaEngine, req: GenerationRequest, token: CancelToken | None = None
) -> tuple[str, list[Finish]]:
    pieces: list[str] = []
    finishes: list[Finish] = []
    async with asyncio.timeout(TIMEOUT):
        async for item in engine.generate(req, token or CancelToken()):
            if isinstance(item, Finish):
                finishes.append(item)
            else:
                assert not finishes, "nothing may follow Finish"
                pieces.append(item)
    return "".join(pieces), finishes


async def alone(engine: BatchedLlamaEngine, reqs: Sequence[GenerationRequest]) -> list[str]:
    """Each request's text when it runs by itself (one after the other)."""
    return [(await collect(engine, GenerationRequest(f"{r.message_id}-alone", r.text, r.max_tokens,
                                                      temperature=r.temperature, seed=r.seed)))[0]
            for r in reqs]


def stats(engine: BatchedLlamaEngine, mid: str) -> SequenceStats:
    found = engine.sequence_stats(mid)
    assert found is not None, mid
    return found


def prefills_of(steps: Sequence[Step], mid: str) -> list[tuple[int, int]]:
    """(step index, prompt tokens) of every step that prefilled `mid`."""
    return [(s.index, n) for s in list(steps) for m, n in s.prefilled if m == mid]  # a copy: the thread appends


async def until(condition: Any) -> None:
    await wait_until(condition, timeout=TIMEOUT, interval=0.005)


async def test_chats_decode_together_one_token_each_per_step() -> None:
    async with started(n_seq=3) as engine:
        reqs = [request(f"m{i}", QUESTIONS[i], 40) for i in range(3)]
        results = await asyncio.gather(*(collect(engine, r) for r in reqs))
        solo = await alone(engine, reqs)
        steps = list(engine.steps)
    for (text, finishes), expected, req in zip(results, solo, reqs):
        assert finishes == [Finish("length")] and text == expected
        # one token from the end of its prefill, then one per decode step
        assert sum(req.message_id in s.decoded for s in steps) == stats(engine, req.message_id).generated_tokens - 1 == 39
    assert all(len(set(s.decoded)) == len(s.decoded) <= 3 for s in steps)
    assert max(len(s.decoded) for s in steps) == 3
    assert len({text for text, _ in results}) == 3


async def test_a_waiting_chat_takes_a_freed_slot_at_the_next_step() -> None:
    """Two slots, both busy: a third chat waits, takes the slot of a cancelled chat at the
    next step; a fourth waits and takes the slot of a chat that finished."""
    async with started(n_seq=2) as engine:
        token = CancelToken()
        first = asyncio.create_task(collect(engine, request("a", QUESTIONS[0], 1500), token))
        second = asyncio.create_task(collect(engine, request("b", QUESTIONS[1], 1500)))
        await until(lambda: all(engine.sequence_stats(m) and stats(engine, m).admitted_at for m in ("a", "b")))
        third = asyncio.create_task(collect(engine, request("c", QUESTIONS[2], 400)))
        await until(lambda: engine.sequence_stats("c") is not None)
        token.cancel()
        await until(lambda: stats(engine, "c").admitted_at is not None)
        fourth = asyncio.create_task(collect(engine, request("d", QUESTIONS[3], 20)))
        results = await asyncio.gather(first, second, third, fourth)
        solo = await alone(engine, [request("c", QUESTIONS[2], 400), request("d", QUESTIONS[3], 20)])
        steps = list(engine.steps)
    a, b, c, d = (stats(engine, m) for m in "abcd")
    assert a.released_at is not None and c.released_at is not None
    assert c.queued_at < a.released_at and d.queued_at < c.released_at  # each really waited
    for freed, waiting, finish in ((a, c, "cancelled"), (c, d, "length")):
        assert freed.finish == finish and freed.released_step is not None and waiting.admitted_step is not None
        assert freed.released_step <= waiting.admitted_step <= freed.released_step + 1
        assert waiting.slot == freed.slot
    assert b.released_step is not None and d.released_step is not None and b.released_step > d.released_step
    assert all(len(set(s.decoded) | {m for m, _ in s.prefilled}) <= 2 for s in steps)
    assert [results[2][0], results[3][0]] == solo


async def test_a_freed_slot_below_busy_ones_is_filled_and_every_step_is_in_slot_order() -> None:
    """llama.cpp evaluates a step in one pass only over consecutive slots in increasing order
    (test_llamacpp_adapter pins it). A chat that ends below busy slots leaves a hole: with no
    chat waiting, the chat in the highest slot moves down into it, and its answer is the same
    as if it had run alone; a chat that joins then takes the lowest free slot. Every step lists
    its chats by slot."""
    async with started(n_seq=3) as engine:
        texts = {m: QUESTIONS[3 + i] for i, m in enumerate("efg")}
        tokens = {m: CancelToken() for m in "efg"}
        running = {m: asyncio.create_task(collect(engine, request(m, texts[m], 300), tokens[m])) for m in "efg"}
        await until(lambda: all(engine.sequence_stats(m) and stats(engine, m).generated_tokens >= 5 for m in "efg"))
        by_slot = {stats(engine, m).slot: m for m in "efg"}
        assert set(by_slot) == {0, 1, 2}
        low, middle, top = by_slot[0], by_slot[1], by_slot[2]
        tokens[low].cancel()
        await until(lambda: stats(engine, top).moves == 1)
        h = asyncio.create_task(collect(engine, request("h", QUESTIONS[6], 20)))
        answers = {m: await running[m] for m in (middle, top)}
        await h
        steps = list(engine.steps)
        solo = await alone(engine, [request(m, texts[m], 300) for m in (middle, top)])
    assert [answers[middle][0], answers[top][0]] == solo
    assert (stats(engine, top).moves, stats(engine, middle).moves, stats(engine, "h").slot) == (1, 0, 2)
    moved_at = stats(engine, low).released_step
    assert moved_at is not None
    assert any(s.decoded == (top, middle, "h") for s in steps)  # top now in slot 0, h in 2
    slots = {middle: lambda i: 1, top: lambda i: 2 if i < moved_at else 0, low: lambda i: 0, "h": lambda i: 2}
    for step in steps:
        assert [slots[m](step.index) for m in step.decoded] == sorted(slots[m](step.index) for m in step.decoded), step


async def test_stop_removes_only_its_own_sequence() -> None:
    async with started(n_seq=3) as engine:
        reqs = [request(f"c{i}", QUESTIONS[i], 150) for i in range(3)]
        uncancelled = await asyncio.gather(*(collect(engine, r) for r in reqs))

        runs = [GenerationRequest(f"d{i}", r.text, r.max_tokens) for i, r in enumerate(reqs)]
        token = CancelToken()
        tasks = [asyncio.create_task(collect(engine, r, token if i == 1 else None)) for i, r in enumerate(runs)]
        await until(lambda: engine.sequence_stats("d1") is not None and stats(engine, "d1").generated_tokens >= 10)
        step_at_cancel = engine.step_count
        token.cancel()
        stopped_text, stopped_finishes = await tasks[1]  # returns at once, before the thread drops it
        await until(lambda: stats(engine, "d1").released_at is not None)
        results = await asyncio.gather(tasks[0], tasks[2])
        reused = await collect(engine, request("after", QUESTIONS[3], 5))
    s_stopped = stats(engine, "d1")
    assert stopped_finishes == [] and stopped_text == uncancelled[1][0][: len(stopped_text)]
    assert s_stopped.finish == "cancelled" and s_stopped.generated_tokens < 150
    assert s_stopped.released_step is not None and s_stopped.released_step <= step_at_cancel + 1
    assert s_stopped.tokens_after_cancel <= 1
    assert token.phase_at_cancel is Phase.GENERATING and token.phase is Phase.FINISHED
    assert [results[0], results[1]] == [uncancelled[0], uncancelled[2]]
    assert reused[1] == [Finish("length")]


async def test_a_cancel_during_prefill_stops_that_prompt_only() -> None:
    prompt = " ".join(QUESTIONS) * 8
    async with started(n_seq=2, prefill_chunk=32) as engine:
        runner = request("runner", QUESTIONS[0], 1500)
        (solo,) = await alone(engine, [runner])
        running = asyncio.create_task(collect(engine, runner))
        await until(lambda: engine.sequence_stats("runner") is not None and stats(engine, "runner").generated_tokens >= 3)
        token = CancelToken()
        long = asyncio.create_task(collect(engine, request("long", prompt, 50), token))
        await until(lambda: len(prefills_of(engine.steps, "long")) >= 2)
        token.cancel()
        assert await long == ("", [])
        await until(lambda: stats(engine, "long").released_at is not None)
        text, finishes = await running
        steps = list(engine.steps)
    s_long = stats(engine, "long")
    assert token.phase_at_cancel is Phase.PROMPT and s_long.finish == "cancelled" and s_long.generated_tokens == 0
    done = prefills_of(steps, "long")
    assert sum(n for _, n in done) < s_long.prompt_tokens
    assert s_long.released_step is not None and all(i < s_long.released_step for i, _ in done)
    assert (text, finishes) == (solo, [Finish("length")])


async def test_a_long_prompt_joins_in_chunks_between_decode_steps() -> None:
    chunk = 64
    prompt = " ".join(QUESTIONS) * 5
    async with started(n_seq=4, n_ctx=2048, prefill_chunk=chunk) as engine:
        runners = [request(f"r{i}", QUESTIONS[i], 600) for i in range(3)]
        without = await asyncio.gather(*(collect(engine, r) for r in runners))
        runners = [GenerationRequest(f"j{i}", r.text, r.max_tokens) for i, r in enumerate(runners)]
        tasks = [asyncio.create_task(collect(engine, r)) for r in runners]
        await until(lambda: all(engine.sequence_stats(r.message_id) and stats(engine, r.message_id).generated_tokens >= 5
                                for r in runners))
        joined = await collect(engine, request("joiner", prompt, 10))
        steps = list(engine.steps)  # the engine keeps the latest 512
        results = await asyncio.gather(*tasks)
    s_join = stats(engine, "joiner")
    assert s_join.prompt_tokens > 1000 and joined[1] == [Finish("length")]
    done = prefills_of(steps, "joiner")
    assert [n for _, n in done[:-1]] == [chunk] * (len(done) - 1) and 0 < done[-1][1] <= chunk
    assert sum(n for _, n in done) == s_join.prompt_tokens
    indexes = [i for i, _ in done]
    assert indexes == list(range(indexes[0], indexes[0] + len(indexes)))  # one chunk per step
    by_index = {s.index: s for s in steps}
    for index in indexes:  # every running chat got its token in each of those steps
        assert {r.message_id for r in runners} <= set(by_index[index].decoded)
    assert results == without


async def test_sampling_is_per_request() -> None:
    async with started(n_seq=4, temperature=0.9) as engine:
        text = QUESTIONS[5]
        seeded = await asyncio.gather(
            collect(engine, request("s1", text, 60, seed=42)),
            collect(engine, request("s2", text, 60, seed=42)),
            collect(engine, request("s3", text, 60, seed=43)),
            collect(engine, request("g1", text, 60, temperature=0.0)),
        )
        greedy_again = await collect(engine, request("g2", text, 60, temperature=0.0))
        seeded_again = await collect(engine, request("s4", text, 60, seed=42))
    assert seeded[0] == seeded[1] == seeded_again
    assert seeded[2][0] != seeded[0][0]
    assert seeded[3] == greedy_again and greedy_again[0] not in (seeded[0][0], seeded[2][0])


async def test_context_and_length_limits() -> None:
    async with started(n_seq=2, n_ctx=256) as engine:
        assert engine.n_ctx == 256
        text, finishes = await collect(engine, request("full", "fill it", 10_000))
        s_full = stats(engine, "full")
        assert finishes == [Finish("length")]
        assert s_full.generated_tokens == engine.n_ctx - s_full.prompt_tokens + 1  # the last one is never evaluated
        assert await collect(engine, request("none", "nothing", 0)) == ("", [Finish("length")])
        text, finishes = await collect(engine, request("seven", "count", 7))
        assert finishes == [Finish("length")] and stats(engine, "seven").generated_tokens == 7
        with pytest.raises(PromptTooLong, match="too long"):
            await collect(engine, request("huge", QUESTIONS[7] * 40, 10))
        assert engine.sequence_stats("huge") is None
        turns = [Turn("user" if i % 2 == 0 else "assistant", QUESTIONS[i % 8] * 2) for i in range(16)]
        text, finishes = await collect(engine, request("history", "and now?", 20, history=turns))
        s_hist = stats(engine, "history")
        assert finishes == [Finish("length")] and 0 < s_hist.history_dropped < 8  # of 8 exchanges
        assert s_hist.prompt_tokens + 20 <= engine.n_ctx


async def test_a_consumer_that_leaves_or_lags_does_not_hold_the_others() -> None:
    async with started(n_seq=2, max_backlog=4, handoff_window_s=0.0) as engine:
        lagging = engine.generate(request("lag", QUESTIONS[0], 500), CancelToken())
        await anext(lagging)  # then it stops reading
        text, finishes = await collect(engine, request("other", QUESTIONS[1], 100))
        assert finishes == [Finish("length")] and stats(engine, "other").generated_tokens == 100
        assert stats(engine, "lag").generated_tokens <= 10  # what it took, then 4 pieces behind
        await lagging.aclose()
        await until(lambda: stats(engine, "lag").released_at is not None)
        assert stats(engine, "lag").finish == "cancelled"
        assert (await collect(engine, request("next", QUESTIONS[2], 5)))[1] == [Finish("length")]


async def test_smollm2_answers_are_the_same_alone_or_batched() -> None:
    """The shipped Q4_1 file: greedy and seeded answers to real questions do not depend on
    the chats decoded beside them, nor on a long prompt joining them."""
    questions = ["What is the capital of France?", "Name three colors.", "What is 2 + 2?",
                 "Tell me a short story about the sea."]
    async with started(model=ensure_smollm2(), n_seq=5, n_ctx=1024, prefill_chunk=64) as engine:
        reqs = [request(f"q{i}", q, 24, **({"temperature": 0.7, "seed": 3} if i == 3 else {}))
                for i, q in enumerate(questions)]
        solo = await alone(engine, reqs)
        story = " ".join(f"The {w} sat on mat {i}." for i, w in enumerate(["cat", "dog", "owl", "fox"] * 12))
        tasks = [asyncio.create_task(collect(engine, r)) for r in reqs]
        await until(lambda: all(engine.sequence_stats(r.message_id) and stats(engine, r.message_id).generated_tokens >= 2
                                for r in reqs))
        joiner = await collect(engine, request("summary", "Summarize: " + story, 8))
        results = await asyncio.gather(*tasks)
    assert [text for text, _ in results] == solo
    assert "4" in solo[2]
    assert stats(engine, "summary").prompt_tokens > 256 and joiner[1] == [Finish("length")]


async def test_prompts_are_built_as_the_one_at_a_time_engine_builds_them() -> None:
    """System prompt (the request's, else the engine's), history and template: the same prompt
    tokens as `LlamaEngine`'s for the same requests."""
    turns = [Turn("user", QUESTIONS[1]), Turn("assistant", QUESTIONS[2]), Turn("user", QUESTIONS[3]),
             Turn("assistant", QUESTIONS[4], status="cancelled")]
    reqs = [request("plain", QUESTIONS[0], 1), request("own", QUESTIONS[0], 1, system="Answer in French."),
            request("history", QUESTIONS[0], 1, history=turns)]
    one = LlamaEngine(system_prompt="Be brief.", temperature=0.0)
    await one.start()
    try:
        counts = []
        for req in reqs:
            await collect_one(one, req)
            assert one.last_stats is not None
            counts.append(one.last_stats.prompt_tokens)
    finally:
        await one.close()
    async with started(n_seq=2, system_prompt="Be brief.") as engine:
        assert engine.model == one.model == "builtin"
        for req, count in zip(reqs, counts):
            await collect(engine, req)
            assert stats(engine, req.message_id).prompt_tokens == count, req.message_id
        async with started(n_seq=1) as bare:  # no system prompt of its own
            await collect(bare, reqs[0])
            assert stats(bare, "plain").prompt_tokens < counts[0]


async def collect_one(engine: LlamaEngine, req: GenerationRequest) -> None:
    async with asyncio.timeout(TIMEOUT):
        async for _ in engine.generate(req, CancelToken()):
            pass
