"""The llama.cpp engine (llama-cpp-python), by default on the tiny built-in model.

Prompts are rendered with the model's own chat template (GGUF metadata, through
llama-cpp-python's `Jinja2ChatFormatter`); `worker.prompt` chooses the turns that fit the
context. Generation stops at an end-of-generation token, and at the template's end-of-turn
token too when llama.cpp does not mark it as one. Each request may set its temperature
(0: greedy) and seed; the engine's own are the defaults.

All model work runs on one dedicated thread per engine, so one engine instance runs one
generation at a time (a second `generate` waits for the first). The thread hands its
pieces to the event loop through a `Handoff`, which wakes the loop at most once per
coalescing window; it checks the cancel token after every token, and llama.cpp's abort
callback reads the same token while the prompt is evaluated, so a cancel during a long
prompt stops the prefill as well.
"""

from __future__ import annotations

import asyncio
import codecs
import time
from collections.abc import AsyncGenerator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import llama_cpp
import structlog

from protocol import coalesce
from worker import prompt
from worker.cancel_token import CancelToken, Phase
from worker.engines.base import DEFAULT_TEMPERATURE, Finish, GenerationRequest
from worker.engines.handoff import Handoff
from worker.engines.llamacpp import (
    ChatFormat, LlamaPrefix, Sampler, Vocab, log_model_loaded, quiet_logs, route_logs, thread_counts,
)
from worker.model.choice import EngineModel, ModelFile, engine_model_file, engine_model_name

log = structlog.get_logger("worker.llama")


@dataclass(slots=True)
class GenerationStats:
    """What one job did; the generation thread fills it in as it goes."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    history_dropped: int = 0
    """Earlier exchanges left out of the prompt to fit the context."""
    prefill_aborted: bool = False
    finish: str = ""
    """"stop", "length", "cancelled" or "error" once the job is over."""
    idle_at: float | None = None
    """`time.monotonic()` when the thread stopped touching the model for this job."""


class _Done:
    """Sentinel: the thread has finished with the job."""


_Item = str | Finish | Exception | _Done


@dataclass(slots=True)
class _Job:
    request: GenerationRequest
    token: CancelToken
    handoff: Handoff[_Item]
    stats: GenerationStats = field(default_factory=GenerationStats)
    abandoned: bool = False
    """Set when the consumer stops iterating early (or the engine closes)."""

    @property
    def stopped(self) -> bool:
        return self.token.cancelled or self.abandoned

    def emit(self, item: _Item) -> None:
        """Hand `item` to the loop; the end of the job (anything but text) at once."""
        if isinstance(item, str):
            self.handoff.wait_for_room(lambda: self.stopped)
            self.handoff.put(item)
        else:
            self.handoff.put(item, urgent=True)


class LlamaEngine:
    name = "llama"
    coalesces = True

    def __init__(
        self,
        model: EngineModel = None,
        *,
        n_ctx: int = 2048,
        n_threads: int | None = None,
        n_gpu_layers: int = 0,
        system_prompt: str | None = None,
        seed: int | None = None,
        temperature: float = DEFAULT_TEMPERATURE,
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
        n_batch: int = 512,
        n_ubatch: int = 128,
        handoff_window_s: float = coalesce.WINDOW_S,
    ) -> None:
        """`model`: a resolved `ModelFile`, a GGUF path, or None for the built-in model.
        `seed` None: a random seed per generation (unless the request gives one)."""
        self._model_arg = model
        self.model_file: ModelFile | None = model if isinstance(model, ModelFile) else None
        self.model = engine_model_name(model)
        self.n_ctx = n_ctx
        self._n_threads = n_threads
        self._n_gpu_layers = n_gpu_layers
        self._system_prompt = system_prompt or None
        self._seed = seed
        self._temperature = temperature
        self._cutoffs = (top_k, top_p, min_p)
        self._n_batch = n_batch
        self._n_ubatch = n_ubatch
        self._handoff_window_s = handoff_window_s
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama-gen")
        self._llm: llama_cpp.Llama | None = None
        self._prefix: LlamaPrefix | None = None
        self._chat: ChatFormat | None = None
        self._abort_cb: Any = None  # keeps the ctypes callback alive
        self._active: _Job | None = None
        self._canonical = 0
        """Leading KV-cache tokens evaluated exactly as a fresh prompt evaluation would."""
        self.last_stats: GenerationStats | None = None
        """Stats of the latest job (live while it runs)."""

    # lifecycle

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        await loop.run_in_executor(self._executor, self._load)
        assert self.model_file is not None and self._chat is not None
        log_model_loaded(log, self.model_file, self._chat, started, n_ctx=self.n_ctx, n_gpu_layers=self._n_gpu_layers)

    async def close(self) -> None:
        if self._active is not None:
            self._active.abandoned = True
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._free)
        self._executor.shutdown(wait=False)

    def _load(self) -> None:
        route_logs()
        self.model_file = engine_model_file(self._model_arg)
        threads, threads_batch = thread_counts(self._n_threads)
        llm = llama_cpp.Llama(
            model_path=str(self.model_file.path),
            n_ctx=self.n_ctx,
            n_batch=self._n_batch,
            n_ubatch=self._n_ubatch,
            n_threads=threads,
            n_threads_batch=threads_batch,
            n_gpu_layers=self._n_gpu_layers,
            verbose=False,
        )
        self._llm = llm
        self._prefix = LlamaPrefix(llm)
        self.n_ctx = llm.n_ctx()
        self._abort_cb = llama_cpp.ggml_abort_callback(self._should_abort)
        vocab = Vocab(llama_cpp.llama_model_get_vocab(llm.model))
        self._chat = ChatFormat(vocab, llm.metadata.get("tokenizer.chat_template"))

    @property
    def end_of_turn(self) -> str | None:
        """The chat template's end-of-turn marker (None before `start`, or without a template)."""
        return self._chat.end_of_turn if self._chat else None

    def _free(self) -> None:
        if self._llm is not None:
            self._llm.close()
            self._llm = None
            self._prefix = None
        self._abort_cb = None

    def _should_abort(self, _data: object) -> bool:
        """llama.cpp's abort callback: called between graph nodes while a prompt is evaluated."""
        job = self._active
        if job is None or not job.stopped:
            return False
        quiet_logs(True)  # llama.cpp calls this on the thread that decodes
        return True

    # prompt

    def format_prompt(self, messages: list[prompt.Message]) -> str:
        """The prompt text: the model's chat template, else `prompt.plain_form`."""
        return self._require_chat().render(messages)

    def _require_chat(self) -> ChatFormat:
        self._require_llm()
        assert self._chat is not None
        return self._chat

    # generation (async side)

    async def generate(
        self, request: GenerationRequest, token: CancelToken
    ) -> AsyncGenerator[str | Finish, None]:
        """Pieces that arrive within one window are yielded joined, as one."""
        self._require_llm()
        loop = asyncio.get_running_loop()
        handoff: Handoff[_Item] = Handoff(loop, self._handoff_window_s)
        token.add_callback(lambda _token: handoff.wake_producer())
        job = _Job(request, token, handoff)
        self.last_stats = job.stats
        future = loop.run_in_executor(self._executor, self._run_job, job)
        try:
            while True:
                text: list[str] = []
                for item in await handoff.take():
                    if isinstance(item, str):
                        text.append(item)
                        continue
                    if text and not token.cancelled:
                        yield "".join(text)
                    text = []
                    if isinstance(item, _Done):
                        return
                    if isinstance(item, Exception):
                        raise item
                    if not token.cancelled:
                        yield item
                if text and not token.cancelled:  # nothing is yielded after a cancel
                    yield "".join(text)
        finally:
            job.abandoned = True
            handoff.wake_producer()
            await future
            handoff.close()

    # generation (thread side)

    def _run_job(self, job: _Job) -> None:
        self._active = job
        try:
            self._generate_sync(job)
        except Exception as exc:  # handed to the consumer, which re-raises it
            job.stats.finish = "error"
            job.emit(exc)
        finally:
            self._active = None
            job.stats.idle_at = time.monotonic()
            if not job.stats.finish:
                job.stats.finish = "cancelled"
            job.token.set_phase(Phase.FINISHED)
            job.emit(_Done())

    def _generate_sync(self, job: _Job) -> None:
        if job.stopped:  # cancelled while it waited for the previous job
            return
        temperature, seed = self._sampling(job.request)
        tokens, job.stats.history_dropped = self._require_chat().fit(job.request, self.n_ctx, self._system_prompt)
        job.stats.prompt_tokens = len(tokens)
        if job.stopped:
            return
        job.token.set_phase(Phase.PROMPT)
        exact = temperature <= 0 or seed is not None
        if not self._eval_prompt(job, self._reuse_prefix(tokens, exact)):
            return
        job.token.set_phase(Phase.GENERATING)
        chat = self._require_chat()
        top_k, top_p, min_p = self._cutoffs
        sampler = Sampler(
            chat.vocab, banned=chat.banned, temperature=temperature, seed=seed, top_k=top_k, top_p=top_p, min_p=min_p
        )
        try:
            self._decode_loop(job, sampler, chat)
        finally:
            sampler.close()

    def _decode_loop(self, job: _Job, sampler: Sampler, chat: ChatFormat) -> None:
        cache = self._require_prefix()
        stats = job.stats
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        started = False  # strip the leading space of the reply
        while True:
            if job.stopped:
                return
            if stats.generated_tokens >= job.request.max_tokens or cache.length >= self.n_ctx:
                self._finish(job, "length", decoder.decode(b"", final=True))
                return
            tok = sampler.sample(cache.ctx, -1)
            if chat.ends_answer(tok):
                self._finish(job, "stop", decoder.decode(b"", final=True))
                return
            stats.generated_tokens += 1
            piece = decoder.decode(chat.vocab.piece(tok))
            if not started:
                piece = piece.lstrip(" ")
                started = bool(piece)
            if piece:
                job.emit(piece)
            if stats.generated_tokens < job.request.max_tokens and not job.stopped:
                if not self._eval(job, [tok]):
                    return

    def _finish(self, job: _Job, reason: Literal["stop", "length"], tail: str) -> None:
        if tail:
            job.emit(tail)
        job.stats.finish = reason
        job.emit(Finish(reason))

    def _reuse_prefix(self, tokens: list[int], exact: bool) -> list[int]:
        """Keep the KV cache for the prefix shared with the previous job (`prompt.reuse_length`:
        only its canonical, aligned part when the request must be reproducible); return the rest."""
        cache = self._require_prefix()
        common = cache.common_prefix(tokens, len(tokens) - 1)  # evaluate one token at least
        keep = prompt.reuse_length(common, self._canonical, self._n_ubatch, exact)
        if not cache.keep(keep) or not keep:
            keep = self._canonical = 0
        self._canonical = prompt.canonical_after(keep, self._canonical, len(tokens), self._n_ubatch)
        return tokens[keep:]

    def _eval_prompt(self, job: _Job, tokens: list[int]) -> bool:
        """`_eval` with llama.cpp's abort callback attached, so a cancel stops a long prompt
        evaluation. llama.cpp calls it after every graph node, and a Python callback takes the
        GIL each time (dozens of times per token: docs/PERFORMANCE.md): it is detached for
        decoding, where the cancel flag is read after every token."""
        cache = self._require_prefix()
        cache.set_abort(self._abort_cb)
        try:
            return self._eval(job, tokens)
        finally:
            cache.set_abort(None)

    def _eval(self, job: _Job, tokens: list[int]) -> bool:
        """Evaluate `tokens`; False when the abort callback stopped it for a cancel."""
        try:
            if self._require_prefix().evaluate(tokens):
                return True
        finally:
            quiet_logs(False)
        if job.token.phase is Phase.PROMPT:
            job.stats.prefill_aborted = True
        self._canonical = 0  # the aborted cache was cleared
        return False

    def _sampling(self, request: GenerationRequest) -> tuple[float, int | None]:
        """(temperature, seed): the request's, else the engine's."""
        temperature = self._temperature if request.temperature is None else request.temperature
        return temperature, self._seed if request.seed is None else request.seed

    def _require_llm(self) -> llama_cpp.Llama:
        if self._llm is None:
            raise RuntimeError("LlamaEngine is not started (or already closed)")
        return self._llm

    def _require_prefix(self) -> LlamaPrefix:
        self._require_llm()
        assert self._prefix is not None
        return self._prefix

