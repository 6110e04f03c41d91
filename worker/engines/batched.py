"""One llama.cpp model serving many chats at once: continuous batching on one generation thread.

One `BatchedLlamaEngine` holds the model and one context with `n_seq` sequence slots; the
worker's N job slots all share it (`[engine] * n_seq`). Its thread runs steps; each step is
- one `llama_decode` with the last token of every generating sequence (each sequence gets one
  token per step), then
- prefill: prompt chunks of waiting sequences, at most `prefill_chunk` prompt tokens per step,
  one sequence's chunk per call, so a long prompt joining running chats delays them by at most
  one chunk.

Continuous batching: a sequence that ends (stop, length, cancel, error) has its KV cells
removed (`llama_memory_seq_rm`) and its slot freed at once; a waiting request takes the lowest
free slot at the next step, and when none waits the sequence in the highest slot moves down into
the hole, so that each step is one run of consecutive slots: llama.cpp's one pass. A Stop ends only its own sequence: the cancel wakes that request's `generate`,
which returns at once, and the thread drops the sequence at the next step boundary, within one
decode step, without touching the others (no abort callback: it would stop everyone's decode).

Every sequence's logits are the same whatever else shares its batch (tests pin it): prompts are
evaluated in chunks aligned at the prompt's start, each in a call of its own, and flash attention
is off (`worker.engines.llamacpp.Context`). So a greedy answer, or one with a seed, is the same
alone or among seven others. Each sequence has its own sampler (temperature, seed: the
request's, else the engine's) and its own context of `n_ctx` tokens (its KV stream). Prompts,
stops and banned tokens are those of the one-at-a-time engine (`llamacpp.ChatFormat`: the model's
chat template, the latest exchanges that fit, the request's system prompt else the engine's).

The thread hands pieces to the event loop through one `Handoff` per request (at most one loop
wake-up per coalescing window). A consumer that falls `max_backlog` pieces behind is skipped in
decode steps until it catches up, instead of blocking the thread that serves everyone.
"""

from __future__ import annotations

import asyncio
import codecs
import enum
import heapq
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import structlog

from protocol import coalesce
from worker.cancel_token import CancelToken, Phase
from worker.engines.base import DEFAULT_TEMPERATURE, Finish, GenerationRequest
from worker.engines.handoff import Handoff
from worker.engines.llamacpp import (
    Batch, ChatFormat, Context, DecodeError, LlamaCppError, Model, Sampler, log_model_loaded,
)
from worker.model.choice import EngineModel, ModelFile, engine_model_file, engine_model_name

_log = logging.getLogger("tokenrelay.batched")
log = structlog.get_logger("worker.batched")

_RECENT = 512
"""How many finished sequences' stats, and how many steps, the engine keeps for inspection."""


@dataclass(slots=True)
class SequenceStats:
    """What one request did; the generation thread fills it in as it goes. Times are
    `time.monotonic()`, like `CancelToken.cancelled_at`."""

    message_id: str
    prompt_tokens: int = 0
    history_dropped: int = 0
    generated_tokens: int = 0
    tokens_after_cancel: int = 0
    """Tokens sampled for it after its token was cancelled (the step that was running)."""
    slot: int | None = None
    """The slot it was admitted into."""
    moves: int = 0
    """How often its KV cells were moved down into a freed slot (`_Runner.compact`)."""
    worst_prefill_step_s: float = 0.0
    """The longest step that evaluated part of its prompt: how long the chats decoding beside
    it waited for their next token because of it."""
    finish: str = ""
    """"stop", "length", "cancelled" or "error" once it is over."""
    queued_at: float = 0.0
    admitted_at: float | None = None
    first_token_at: float | None = None
    released_at: float | None = None
    """When its KV cells were removed and its slot freed."""
    admitted_step: int | None = None
    cancel_step: int | None = None
    """The step counter when its token was cancelled."""
    released_step: int | None = None
    """The step counter at its release: k if released during step k, or between steps
    k - 1 and k. `admitted_step` likewise: the first step it could take part in."""


@dataclass(frozen=True, slots=True)
class Step:
    """One step of the generation thread."""

    index: int
    decoded: tuple[str, ...]
    """Message ids that got one token each, in one decode call."""
    prefilled: tuple[tuple[str, int], ...]
    """(message id, prompt tokens) evaluated after it, one call each."""
    started: float
    decode_s: float
    prefill_s: float


def plan_prefill(waiting: Sequence[tuple[int, int]], chunk: int) -> list[int]:
    """Prompt tokens to evaluate this step for each waiting sequence, given (evaluated so far,
    prompt length) in admission order: at most `chunk` in all, each sequence's next piece
    ending at a multiple of `chunk` from its prompt's start (or at its end), so that its
    prompt is cut the same way whoever else is waiting. The oldest always gets its piece; a
    later one only if the whole of its piece still fits (first come, first served)."""
    plan: list[int] = []
    budget = chunk
    for done, length in waiting:
        piece = min(chunk - done % chunk, length - done)
        if piece > budget:
            break
        plan.append(piece)
        budget -= piece
    return plan


class _State(enum.Enum):
    QUEUED = "queued"
    PREFILL = "prefill"
    DECODING = "decoding"
    ENDED = "ended"


class _Done:
    """Sentinel: the thread has finished with the request."""


class _Cancelled:
    """Sentinel: the request's token was cancelled (put by the cancel callback)."""


_Item = str | Finish | Exception | _Done | _Cancelled


@dataclass(eq=False, slots=True)
class _Seq:
    request: GenerationRequest
    token: CancelToken
    handoff: Handoff[_Item]
    prompt: list[int]
    stats: SequenceStats
    temperature: float
    seed: int | None
    state: _State = _State.QUEUED
    slot: int = -1
    pos: int = 0
    """Tokens of this sequence in the KV cache."""
    last: int = -1
    """The token sampled last, to be evaluated at the next decode step."""
    sampler: Sampler | None = None
    decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace")
    )
    text_started: bool = False
    emitted: int = 0
    """Pieces handed over (written by the thread only)."""
    taken: int = 0
    """Pieces the consumer took (written by the loop only)."""
    abandoned: bool = False
    """The consumer is gone (cancelled, or it stopped iterating)."""

    @property
    def stopped(self) -> bool:
        return self.abandoned or self.token.cancelled

    def emit(self, item: _Item) -> None:
        if self.abandoned:
            return
        if isinstance(item, str):
            self.emitted += 1
            self.handoff.put(item)
        else:
            self.handoff.put(item, urgent=True)


class BatchedLlamaEngine:
    name = "llama"
    coalesces = True

    def __init__(
        self,
        model: EngineModel = None,
        *,
        n_seq: int = 8,
        n_ctx: int = 2048,
        n_threads: int | None = None,
        n_gpu_layers: int = 0,
        system_prompt: str | None = None,
        temperature: float = DEFAULT_TEMPERATURE,
        seed: int | None = None,
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
        prefill_chunk: int = 64,
        max_backlog: int = 256,
        handoff_window_s: float = coalesce.WINDOW_S,
    ) -> None:
        if n_seq < 1 or prefill_chunk < 1:
            raise ValueError("n_seq and prefill_chunk must be at least 1")
        """`model`: a resolved `ModelFile`, a GGUF path, or None for the built-in model. `seed`
        None: a random seed per request (unless the request gives one). `system_prompt`: for
        requests without their own."""
        self._model_arg = model
        self.model_file: ModelFile | None = model if isinstance(model, ModelFile) else None
        self.model = engine_model_name(model)
        self.n_seq = n_seq
        self.n_ctx = n_ctx
        """Tokens per sequence (prompt and answer); the context holds `n_seq` times that."""
        self._n_threads = n_threads
        self._n_gpu_layers = n_gpu_layers
        self._system_prompt = system_prompt or None
        self._temperature = temperature
        self._seed = seed
        self._cutoffs = (top_k, top_p, min_p)
        self.prefill_chunk = prefill_chunk
        self._max_backlog = max_backlog
        self._handoff_window_s = handoff_window_s
        self._model: Model | None = None
        self._chat: ChatFormat | None = None
        self._thread: threading.Thread | None = None
        self._incoming: deque[_Seq] = deque()
        self._wake = threading.Event()
        self._closing = False
        self._failure: Exception | None = None
        self.steps: deque[Step] = deque(maxlen=_RECENT)
        """The latest steps, oldest first; the thread appends while it runs, so read a copy
        (`list(engine.steps)`)."""
        self.step_count = 0
        self._recent: OrderedDict[str, SequenceStats] = OrderedDict()

    # lifecycle

    async def start(self) -> None:
        """Load the model and create the context on the generation thread, then serve. The
        worker calls it once per job slot: only the first call does anything."""
        if self._thread is not None:
            return
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        started = time.perf_counter()
        self._thread = threading.Thread(target=self._serve, args=(loop, ready), name="llama-batch", daemon=True)
        self._thread.start()
        try:
            await ready
        except BaseException:
            self._thread = None
            raise
        assert self.model_file is not None and self._chat is not None
        log_model_loaded(
            log, self.model_file, self._chat, started,
            n_ctx=self.n_ctx, n_gpu_layers=self._n_gpu_layers, n_seq=self.n_seq, prefill_chunk=self.prefill_chunk,
        )

    async def close(self) -> None:
        """Stop the thread: every request still there ends (its consumer gets nothing more)."""
        thread = self._thread
        if thread is None:
            return
        self._closing = True
        self._wake.set()
        await asyncio.to_thread(thread.join)
        self._thread = None

    def sequence_stats(self, message_id: str) -> SequenceStats | None:
        """Stats of a running or recently finished request."""
        return self._recent.get(message_id)

    # prompt

    def prompt_tokens(self, request: GenerationRequest) -> tuple[list[int], int]:
        """(prompt tokens, earlier exchanges left out): the latest turns that fit one
        sequence's context (`ChatFormat.fit`); `PromptTooLong` if the current turn alone does
        not."""
        self._require_model()
        assert self._chat is not None
        return self._chat.fit(request, self.n_ctx, self._system_prompt)

    # generation (event loop side)

    async def generate(
        self, request: GenerationRequest, token: CancelToken
    ) -> AsyncGenerator[str | Finish, None]:
        """Pieces that arrive within one window are yielded joined, as one. Returns as soon as
        `token` is cancelled; the thread drops the sequence at its next step."""
        self._require_model()
        loop = asyncio.get_running_loop()
        stats = SequenceStats(request.message_id, queued_at=time.monotonic())
        prompt, stats.history_dropped = await asyncio.to_thread(self.prompt_tokens, request)
        stats.prompt_tokens = len(prompt)
        seq = _Seq(
            request,
            token,
            Handoff(loop, self._handoff_window_s),
            prompt,
            stats,
            self._temperature if request.temperature is None else request.temperature,
            self._seed if request.seed is None else request.seed,
        )
        token.add_callback(lambda _token: self._on_cancel(seq))
        self._remember(stats)
        self._incoming.append(seq)
        self._wake.set()
        try:
            while True:
                items = await seq.handoff.take()
                text: list[str] = []
                for item in items:
                    match item:
                        case str():
                            text.append(item)
                        case Finish():
                            if text:
                                yield "".join(text)
                            yield item
                            return
                        case _Done() | _Cancelled():
                            if text and not token.cancelled:
                                yield "".join(text)
                            return
                        case Exception():
                            raise item
                was_behind = seq.emitted - seq.taken >= self._max_backlog
                seq.taken += len(text)
                if was_behind:
                    self._wake.set()  # the thread skipped it: it may have nothing else to do
                if text and not token.cancelled:
                    yield "".join(text)
        finally:
            seq.abandoned = True
            self._wake.set()
            seq.handoff.close()

    def _on_cancel(self, seq: _Seq) -> None:
        """Wake the request's `generate` (it returns) and the thread (it drops the sequence)."""
        seq.stats.cancel_step = self.step_count
        seq.handoff.put(_Cancelled(), urgent=True)
        self._wake.set()

    def _remember(self, stats: SequenceStats) -> None:
        self._recent[stats.message_id] = stats
        self._recent.move_to_end(stats.message_id)
        while len(self._recent) > _RECENT:
            self._recent.popitem(last=False)

    def _require_model(self) -> Model:
        if self._failure is not None:
            raise LlamaCppError("the batched engine failed") from self._failure
        if self._model is None:
            raise RuntimeError("BatchedLlamaEngine is not started (or already closed)")
        return self._model

    # generation thread

    def _serve(self, loop: asyncio.AbstractEventLoop, ready: asyncio.Future[None]) -> None:
        try:
            model, context = self._load()
        except BaseException as exc:
            loop.call_soon_threadsafe(_settle, ready, exc)
            return
        loop.call_soon_threadsafe(_settle, ready, None)
        batch = Batch(max(self.prefill_chunk, self.n_seq))
        runner = _Runner(self, model, context, batch)
        try:
            runner.run()
            runner.end_all(LlamaCppError("the engine was closed"))
        except Exception as exc:  # every request gets it; later ones too (`generate` raises it)
            _log.exception("the batched engine's thread failed")
            self._failure = exc
            runner.end_all(exc)
        finally:
            batch.close()
            context.close()
            self._model = None
            model.close()

    def _load(self) -> tuple[Model, Context]:
        self.model_file = engine_model_file(self._model_arg)
        model = Model(self.model_file.path, n_gpu_layers=self._n_gpu_layers)
        try:
            context = Context(
                model,
                n_seq=self.n_seq,
                n_ctx_seq=self.n_ctx,
                n_batch=max(self.prefill_chunk, self.n_seq),
                n_threads=self._n_threads,
            )
        except BaseException:
            model.close()
            raise
        self.n_ctx = context.n_ctx_seq
        self._chat = ChatFormat(model, model.chat_template())
        self._model = model
        return model, context


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


class _Runner:
    """The generation thread's loop: admit, drop what stopped, one step, again."""

    def __init__(self, engine: BatchedLlamaEngine, model: Model, context: Context, batch: Batch) -> None:
        self.engine = engine
        self.model = model
        self.context = context
        self.batch = batch
        assert engine._chat is not None
        self.chat = engine._chat
        self.free = list(range(context.n_seq))
        """Free slots, a heap: the lowest is taken first, so that busy slots stay consecutive."""
        self.active: list[_Seq] = []
        """Sequences holding a slot, in admission order."""

    def run(self) -> None:
        engine = self.engine
        while not engine._closing:
            self.release_stopped()
            self.admit()
            self.compact()
            runnable = [s for s in self.active if not self.behind(s)]
            if not runnable:
                # Nothing to do until a request, a cancel or a consumer that caught up wakes us;
                # a consumer falling behind is re-checked now and then.
                engine._wake.wait(0.1 if self.active else None)
                engine._wake.clear()
                continue
            self.step(runnable)

    def behind(self, seq: _Seq) -> bool:
        return seq.emitted - seq.taken >= self.engine._max_backlog

    def admit(self) -> None:
        incoming = self.engine._incoming
        while incoming and self.free:
            seq = incoming.popleft()
            if seq.stopped:
                self.end(seq, "cancelled")
                continue
            if seq.request.max_tokens <= 0:
                self.finish(seq, "length")
                continue
            seq.slot = heapq.heappop(self.free)
            seq.stats.slot = seq.slot
            seq.stats.admitted_at = time.monotonic()
            seq.stats.admitted_step = self.engine.step_count
            top_k, top_p, min_p = self.engine._cutoffs
            seq.sampler = Sampler(
                self.model, banned=self.chat.banned, temperature=seq.temperature, seed=seq.seed,
                top_k=top_k, top_p=top_p, min_p=min_p,
            )
            seq.state = _State.PREFILL
            seq.token.set_phase(Phase.PROMPT)
            self.active.append(seq)

    def compact(self) -> None:
        """Close the holes that admission left: while a slot below the highest busy one is
        free (after `admit`, no request waits for it), move the sequence in the highest busy
        slot down into it. A step then covers one run of consecutive slots, one pass (see
        `decode`) instead of one per run. llama.cpp copies the sequence's KV stream before the
        next decode and its logits stay bit for bit the same (test_llamacpp_adapter)."""
        while self.free and self.active:
            top = max(self.active, key=lambda s: s.slot)
            if self.free[0] > top.slot:
                return
            hole = heapq.heappop(self.free)
            self.context.move(top.slot, hole)
            heapq.heappush(self.free, top.slot)
            top.slot = hole
            top.stats.moves += 1

    def release_stopped(self) -> None:
        for seq in [s for s in self.active if s.stopped]:
            self.end(seq, "cancelled")

    def step(self, runnable: list[_Seq]) -> None:
        engine = self.engine
        started = time.monotonic()
        decoding = sorted((s for s in runnable if s.state is _State.DECODING), key=lambda s: s.slot)
        if decoding:
            self.decode(decoding)
        decoded_at = time.monotonic()
        waiting = [s for s in runnable if s.state is _State.PREFILL and not s.stopped]
        plan = plan_prefill([(s.pos, len(s.prompt)) for s in waiting], engine.prefill_chunk)
        prefilled: list[tuple[_Seq, int]] = []
        for seq, count in zip(waiting, plan):
            if seq.stopped:  # cancelled while an earlier call ran: dropped before the next step
                continue
            self.prefill(seq, count)
            prefilled.append((seq, count))
        done = time.monotonic()
        for seq, _count in prefilled:
            seq.stats.worst_prefill_step_s = max(seq.stats.worst_prefill_step_s, done - started)
        engine.steps.append(
            Step(engine.step_count, tuple(s.request.message_id for s in decoding),
                 tuple((s.request.message_id, count) for s, count in prefilled),
                 started, decoded_at - started, done - decoded_at)
        )
        engine.step_count += 1

    def decode(self, seqs: list[_Seq]) -> None:
        """One token for each sequence, in one call. `seqs` come in slot order: llama.cpp
        evaluates a batch over separate KV streams (`kv_unified=False`) in one pass only for a
        run of consecutive sequence ids in increasing order and splits it at every other step
        (slots 0, 1, 2: one pass; 1, 0, 2 or 0, 2: two, of one token on one thread each)."""
        batch = self.batch
        batch.clear()
        indexes = [batch.add(s.last, s.pos, s.slot, logits=True) for s in seqs]
        if not self.evaluate(seqs):
            return
        for seq, index in zip(seqs, indexes):
            seq.pos += 1
            self.sampled(seq, index)

    def prefill(self, seq: _Seq, count: int) -> None:
        batch = self.batch
        batch.clear()
        end = seq.pos + count
        last = end == len(seq.prompt)
        for pos in range(seq.pos, end):
            batch.add(seq.prompt[pos], pos, seq.slot, logits=last and pos == end - 1)
        if not self.evaluate([seq]):
            return
        seq.pos = end
        if last:
            seq.state = _State.DECODING
            seq.token.set_phase(Phase.GENERATING)
            self.sampled(seq, count - 1)

    def evaluate(self, seqs: list[_Seq]) -> bool:
        """Decode the batch; on failure every sequence in it ends with the error."""
        try:
            self.context.decode(self.batch)
        except DecodeError as exc:
            _log.error("%s for %d sequences", exc, len(seqs))
            for seq in seqs:
                seq.emit(exc)
                self.end(seq, "error")
            return False
        return True

    def sampled(self, seq: _Seq, index: int) -> None:
        """Sample the sequence's next token from batch entry `index`, and hand it over."""
        assert seq.sampler is not None
        tok = seq.sampler.sample(self.context, index)
        stats = seq.stats
        if seq.token.cancelled:
            stats.tokens_after_cancel += 1
        if seq.stopped:
            return  # dropped at the next step boundary
        if stats.first_token_at is None:
            stats.first_token_at = time.monotonic()
        if self.chat.ends_answer(tok):
            self.finish(seq, "stop")
            return
        stats.generated_tokens += 1
        piece = seq.decoder.decode(self.model.piece(tok))
        if not seq.text_started:
            piece = piece.lstrip(" ")
            seq.text_started = bool(piece)
        if piece:
            seq.emit(piece)
        if stats.generated_tokens >= seq.request.max_tokens or seq.pos >= self.context.n_ctx_seq:
            self.finish(seq, "length")
        else:
            seq.last = tok

    def finish(self, seq: _Seq, reason: Literal["stop", "length"]) -> None:
        tail = seq.decoder.decode(b"", final=True)
        if tail:
            seq.emit(tail)
        seq.emit(Finish(reason))
        self.end(seq, reason)

    def end(self, seq: _Seq, finish: str) -> None:
        """Remove the sequence's KV cells, free its slot and sampler, tell its consumer."""
        if seq.slot >= 0:
            self.context.remove(seq.slot)
            heapq.heappush(self.free, seq.slot)
            seq.slot = -1
        if seq in self.active:
            self.active.remove(seq)
        if seq.sampler is not None:
            seq.sampler.close()
            seq.sampler = None
        seq.state = _State.ENDED
        stats = seq.stats
        stats.finish = finish
        stats.released_at = time.monotonic()
        stats.released_step = self.engine.step_count
        seq.token.set_phase(Phase.FINISHED)
        seq.emit(_Done())
        _log_end(stats, seq.token)

    def end_all(self, error: Exception) -> None:
        """When the thread stops: every request still held or waiting ends with `error`."""
        self.active, held = [], self.active
        incoming = self.engine._incoming
        for seq in held + [incoming.popleft() for _ in range(len(incoming))]:
            seq.slot = -1  # the context goes with the thread
            seq.emit(error)
            self.end(seq, "error")


def _ms(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else round((end - start) * 1000, 2)


def _log_end(stats: SequenceStats, token: CancelToken) -> None:
    """One line per sequence: the engine's side of a job (queueing, prefill, what a cancel
    cost), beside the worker's `job_finished`."""
    released, admitted, cancelled = stats.released_step or 0, stats.admitted_step, stats.cancel_step
    log.info(
        "sequence_ended",
        message_id=stats.message_id,
        finish=stats.finish,
        slot=stats.slot,
        moves=stats.moves,
        prompt_tokens=stats.prompt_tokens,
        generated_tokens=stats.generated_tokens,
        history_dropped=stats.history_dropped,
        queued_ms=_ms(stats.queued_at, stats.admitted_at),
        first_token_ms=_ms(stats.queued_at, stats.first_token_at),
        steps=None if admitted is None else released - admitted,
        worst_prefill_step_ms=round(stats.worst_prefill_step_s * 1000, 2),
        tokens_after_cancel=None if cancelled is None else stats.tokens_after_cancel,
        steps_after_cancel=None if cancelled is None else released - cancelled,
        cancel_to_release_ms=None if cancelled is None else _ms(token.cancelled_at, stats.released_at),
    )
