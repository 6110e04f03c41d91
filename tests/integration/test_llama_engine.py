"""The real llama.cpp engine on the built-in model: words, limits, cancels, chat history, sampling.

Most tests run the built-in model built with EOS impossible (`tests.models.ENDLESS`): an answer
ends at its length limit or by a cancel, never early by chance."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.models import endless_model  # noqa: F401  (fixture)
from worker import PromptTooLong
from worker.cancel_token import CancelToken, Phase
from worker.engines.base import Finish, GenerationRequest, Turn
from worker.engines.llama import LlamaEngine
from worker.model import ensure_builtin_model
from worker.model.choice import ModelFile
from worker.prompt import STOPPED_NOTE, messages_for

pytestmark = pytest.mark.llama

WORDS = re.compile(r"[A-Za-z0-9 .,!?;:'\"()/-]+")
TIMEOUT = 30.0


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the built-in model once, into a temporary cache folder."""
    cache = tmp_path_factory.mktemp("tokenrelay-cache")
    ensure_builtin_model_in(cache)
    return cache


@pytest.fixture
async def engine(endless_model: ModelFile) -> AsyncIterator[LlamaEngine]:
    """A started engine on the built-in model that never ends an answer by itself."""
    eng = LlamaEngine(endless_model, n_ctx=2048)
    await eng.start()
    yield eng
    await eng.close()


async def test_no_model_given_means_the_built_in_one(model_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENRELAY_CACHE", str(model_cache))
    eng = LlamaEngine(n_ctx=256)
    assert eng.model == "builtin"
    await eng.start()
    try:
        assert eng.model_file is not None and eng.model_file.path == ensure_builtin_model()
        assert len(eng.model_file.sha256) == 64
        pieces, finishes = await collect(eng, request("hello", 5))
        assert len(finishes) == 1
    finally:
        await eng.close()


def ensure_builtin_model_in(cache: Path) -> Path:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TOKENRELAY_CACHE", str(cache))
        return ensure_builtin_model()


def request(
    text: str, max_tokens: int, history: list[Turn] | None = None, **sampling: float | int
) -> GenerationRequest:
    return GenerationRequest("m-" + text[:8], text, max_tokens, history or [], **sampling)  # type: ignore[arg-type]


async def collect(
    eng: LlamaEngine, req: GenerationRequest, token: CancelToken | None = None
) -> tuple[list[str], list[Finish]]:
    pieces: list[str] = []
    finishes: list[Finish] = []
    async with asyncio.timeout(TIMEOUT):
        async for item in eng.generate(req, token or CancelToken()):
            if isinstance(item, Finish):
                finishes.append(item)
            else:
                assert not finishes, "nothing may follow Finish"
                pieces.append(item)
    return pieces, finishes


def long_prompt(words: int) -> str:
    syllables = ["ba", "no", "ki", "te", "lu", "ma", "so", "di"]
    return " ".join(
        syllables[i % 8] + syllables[(i * 3 + 1) % 8] + syllables[(i * 5 + 2) % 8]
        for i in range(words)
    )


class SignallingToken(CancelToken):
    """Sets an asyncio event (thread-safely) when the engine enters the prompt phase."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._loop = loop
        self.in_prompt = asyncio.Event()

    def set_phase(self, phase: Phase) -> None:
        super().set_phase(phase)
        if phase is Phase.PROMPT:
            self._loop.call_soon_threadsafe(self.in_prompt.set)


class CancelInsidePrefill(CancelToken):
    """Cancels itself on the n-th read during the prompt phase.

    During prefill the only reader is llama.cpp's abort callback (between graph nodes),
    so this lands deterministically in the middle of the prompt evaluation.
    """

    def __init__(self, reads: int) -> None:
        super().__init__()
        self._reads_left = reads

    @property
    def cancelled(self) -> bool:
        if self.phase is Phase.PROMPT and not self._cancelled:
            self._reads_left -= 1
            if self._reads_left <= 0:
                self.cancel("test")
        return self._cancelled


async def test_generates_words_then_one_finish(engine: LlamaEngine) -> None:
    token = CancelToken()
    pieces, finishes = await collect(engine, request("tell me a story", 60), token)
    assert engine.last_stats is not None and engine.last_stats.generated_tokens >= 10
    assert len(pieces) >= 2  # streamed: pieces within one hand-off window arrive joined
    assert len(finishes) == 1
    text = "".join(pieces)
    assert WORDS.fullmatch(text), text
    assert len(text.split()) >= 10
    assert all(piece for piece in pieces)
    assert token.phase is Phase.FINISHED
    assert engine.last_stats is not None and engine.last_stats.finish == finishes[0].reason


async def test_max_tokens_is_exact(engine: LlamaEngine) -> None:
    pieces, finishes = await collect(engine, request("count to seven", 7))
    assert finishes == [Finish("length")] and pieces
    assert engine.last_stats is not None and engine.last_stats.generated_tokens == 7


async def test_zero_max_tokens_finishes_at_once(engine: LlamaEngine) -> None:
    pieces, finishes = await collect(engine, request("nothing", 0))
    assert (pieces, finishes) == ([], [Finish("length")])


async def test_cancel_mid_generation_stops_within_one_token(engine: LlamaEngine) -> None:
    """The cancel follows the first piece. The answer cannot end before it: no EOS, and the
    generation thread waits once 256 pieces are not taken, far below the context's ~2000."""
    token = CancelToken()
    received = after_cancel = 0
    generated_at_cancel = -1
    async with asyncio.timeout(TIMEOUT):
        async for item in engine.generate(request("go on forever", 100_000), token):
            assert not isinstance(item, Finish)
            received += 1
            if token.cancelled:
                after_cancel += 1
            else:
                token.cancel()
                stats = engine.last_stats
                assert stats is not None
                generated_at_cancel = stats.generated_tokens  # read after the cancel: at most
                # the token being sampled right now can still be counted
    stats = engine.last_stats
    assert stats is not None
    assert received == 1 and after_cancel == 0
    assert 1 <= generated_at_cancel < engine.n_ctx
    assert stats.generated_tokens - generated_at_cancel <= 1
    assert stats.finish == "cancelled"
    assert token.phase is Phase.FINISHED
    assert token.phase_at_cancel is Phase.GENERATING


async def test_cancel_during_prefill_from_event_loop(engine: LlamaEngine) -> None:
    loop = asyncio.get_running_loop()
    token = SignallingToken(loop)
    task = asyncio.create_task(collect(engine, request(long_prompt(550), 100), token))
    await asyncio.wait_for(token.in_prompt.wait(), TIMEOUT)
    token.cancel()
    pieces, finishes = await asyncio.wait_for(task, TIMEOUT)
    stats = engine.last_stats
    assert stats is not None
    assert (pieces, finishes) == ([], [])
    assert token.phase_at_cancel is Phase.PROMPT
    assert stats.prompt_tokens > 1000
    assert stats.generated_tokens == 0
    assert stats.prefill_aborted

    pieces, finishes = await collect(engine, request("and now", 20))
    assert pieces and finishes == [Finish("length")]
    assert engine.last_stats is not None and engine.last_stats.generated_tokens == 20


async def test_aborted_prefill_leaves_engine_clean(engine: LlamaEngine) -> None:
    """After an abort mid-eval the next job gives exactly what a fresh engine gives."""
    token = CancelInsidePrefill(reads=40)
    pieces, finishes = await collect(engine, request(long_prompt(550), 100), token)
    stats = engine.last_stats
    assert stats is not None
    assert (pieces, finishes) == ([], [])
    assert stats.prefill_aborted and stats.generated_tokens == 0

    follow_up = request("what happens next", 40, [Turn("user", "hi"), Turn("assistant", "ba")], seed=7)
    after_abort = await collect(engine, follow_up)

    fresh = LlamaEngine(engine.model_file, n_ctx=2048)
    await fresh.start()
    try:
        expected = await collect(fresh, follow_up)
    finally:
        await fresh.close()
    assert ("".join(after_abort[0]), after_abort[1]) == ("".join(expected[0]), expected[1])


async def test_event_loop_stays_responsive(engine: LlamaEngine) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    gaps: list[float] = []

    async def ticker() -> None:
        last = loop.time()
        while not stop.is_set():
            await asyncio.sleep(0.001)
            now = loop.time()
            gaps.append(now - last)
            last = now

    ticking = asyncio.create_task(ticker())
    started = loop.time()
    pieces, finishes = await collect(engine, request("talk for a while", 1000))
    elapsed = loop.time() - started
    stop.set()
    await asyncio.wait_for(ticking, TIMEOUT)
    assert len(finishes) == 1
    assert engine.last_stats is not None and engine.last_stats.generated_tokens > 100
    assert len(gaps) >= 20
    assert len(gaps) >= 0.2 * elapsed / 0.001, (len(gaps), elapsed)
    assert max(gaps) < 0.1


async def test_consumer_leaving_early_stops_the_thread(engine: LlamaEngine) -> None:
    token = CancelToken()
    generator = engine.generate(request("stream then leave", 1500), token)
    async with contextlib.aclosing(generator):
        async for _ in generator:
            break
    stats = engine.last_stats
    assert stats is not None
    assert stats.finish == "cancelled" and stats.idle_at is not None
    assert stats.generated_tokens < 1500
    assert not token.cancelled
    pieces, finishes = await collect(engine, request("again", 5))
    assert pieces and finishes == [Finish("length")]
    assert engine.last_stats is not None and engine.last_stats.generated_tokens == 5


async def test_chat_history_goes_through_the_template(engine: LlamaEngine) -> None:
    history = [Turn("user", "hi"), Turn("assistant", "ba"), Turn("user", "go"), Turn("assistant", "mo", "cancelled")]
    assert engine.format_prompt(messages_for([(history[0], history[1]), (history[2], history[3])], "next", None)) == (
        f"<s>User: hi\nAssistant: ba\nUser: go\nAssistant: mo {STOPPED_NOTE}\nUser: next\nAssistant:"
    )
    assert engine.end_of_turn is None  # the built-in template ends a turn with a newline only

    first_pieces, first_finish = await collect(engine, request("hello there", 30))
    assert first_finish and first_pieces
    first_prompt = engine.last_stats.prompt_tokens if engine.last_stats else 0
    turns = [Turn("user", "hello there"), Turn("assistant", "".join(first_pieces))]
    second_pieces, second_finish = await collect(engine, request("and then", 30, turns))
    assert second_finish and second_pieces
    stats = engine.last_stats
    assert stats is not None
    assert stats.prompt_tokens > first_prompt + 30
    assert stats.history_dropped == 0


async def test_long_history_drops_oldest_turns_and_a_text_too_long_is_refused(endless_model: ModelFile) -> None:
    eng = LlamaEngine(endless_model, n_ctx=512)
    await eng.start()
    try:
        turns = [Turn("user" if i % 2 == 0 else "assistant", long_prompt(60)) for i in range(20)]
        pieces, finishes = await collect(eng, request("latest question", 50, turns))
        stats = eng.last_stats
        assert stats is not None
        assert pieces and finishes == [Finish("length")]
        assert 0 < stats.history_dropped < 10  # exchanges
        assert stats.prompt_tokens + 50 <= 512

        token = CancelToken()
        with pytest.raises(PromptTooLong, match="too long for the model"):
            await collect(eng, request(long_prompt(600), 50), token)
        stats = eng.last_stats
        assert stats is not None and stats.finish == "error" and stats.generated_tokens == 0
        assert token.phase_at_cancel is None and token.phase is Phase.FINISHED

        pieces, finishes = await collect(eng, request("still here", 5))  # the engine goes on
        assert pieces and finishes == [Finish("length")]
    finally:
        await eng.close()


async def test_concurrent_generations_run_one_after_the_other(engine: LlamaEngine) -> None:
    """One engine runs one generation at a time; a second call waits its turn."""
    results = await asyncio.gather(
        collect(engine, request("first caller", 40)),
        collect(engine, request("second caller", 40)),
    )
    for pieces, finishes in results:
        assert pieces and finishes == [Finish("length")]


async def test_greedy_and_seeded_answers_repeat_whatever_the_cache_holds(engine: LlamaEngine) -> None:
    """Temperature 0, or a seed, gives the same text every time: also when the KV cache holds
    another prompt that shares a prefix with this one, or this very prompt (a prefix reused
    as is would be evaluated in other batches, and change the logits' last bits)."""
    history = [Turn("user" if i % 2 == 0 else "assistant", long_prompt(40)) for i in range(8)]

    async def text(req: GenerationRequest) -> str:
        pieces, finishes = await collect(engine, req)
        assert finishes == [Finish("length")]
        return "".join(pieces)

    greedy = request("what next", 40, history, temperature=0)
    seeded = request("what next", 40, history, temperature=1.5, seed=11)
    first_greedy, first_seeded = await text(greedy), await text(seeded)
    for other in (request("what else", 30, history), request("what next", 30, history[:4])):
        await text(other)  # leaves a cache that shares a prefix with the prompt
        assert await text(greedy) == first_greedy
        assert await text(seeded) == first_seeded
    assert await text(greedy) == first_greedy  # right after itself: the whole prompt cached
    assert await text(request("what next", 40, history, temperature=1.5, seed=12)) != first_seeded
    assert await text(request("what next", 40, history, temperature=1.5, seed=11 + 0xFFFFFFFF)) == first_seeded
