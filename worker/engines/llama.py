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
import ctypes
import logging
import os
import threading
import time
from collections.abc import AsyncGenerator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import llama_cpp
import numpy as np
import structlog
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from protocol import coalesce
from worker import prompt
from worker.cancel_token import CancelToken, Phase
from worker.engines.base import DEFAULT_TEMPERATURE, Finish, GenerationRequest
from worker.engines.handoff import Handoff
from worker.model.choice import BUILTIN, ModelFile, model_file, resolve_model

_BANNED_ATTRS = (
    llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN
    | llama_cpp.LLAMA_TOKEN_ATTR_UNUSED
    | llama_cpp.LLAMA_TOKEN_ATTR_CONTROL
    | llama_cpp.LLAMA_TOKEN_ATTR_BYTE
)
_ABORTED = "llama_decode returned 2"  # llama.cpp: 2 = aborted by the abort callback

_log = logging.getLogger("tokenrelay.llama_cpp")
log = structlog.get_logger("worker.llama")
_GGML_LOG_LEVELS = {3: logging.WARNING, 4: logging.ERROR}  # DEBUG, INFO, CONT: DEBUG
_thread_state = threading.local()


def _on_llama_log(level: int, text: bytes, _user_data: object) -> None:
    """llama.cpp log lines → `logging`.

    llama-cpp-python's own hook maps an older ggml level enum and prints warnings to
    stderr even with verbose=False. Lines logged while this thread aborts a decode for
    a cancel (llama.cpp notes that it drops the aborted batch) are expected: DEBUG.
    """
    py_level = _GGML_LOG_LEVELS.get(level, logging.DEBUG)
    if getattr(_thread_state, "aborting", False):
        py_level = logging.DEBUG
    if _log.isEnabledFor(py_level):
        _log.log(py_level, "%s", text.decode("utf-8", errors="replace").rstrip())


_LOG_CALLBACK = llama_cpp.llama_log_callback(_on_llama_log)
_NO_ABORT_CALLBACK = llama_cpp.ggml_abort_callback()  # a NULL function pointer: none


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
        model: ModelFile | str | os.PathLike[str] | None = None,
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
        self.model_file: ModelFile | None = model if isinstance(model, ModelFile) else None
        self._model_path = Path(model) if model is not None and not isinstance(model, ModelFile) else None
        self.model = self.model_file.name if self.model_file else (self._model_path.stem if self._model_path else BUILTIN)
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
        self._vocab: Any = None
        self._formatter: Jinja2ChatFormatter | None = None
        self._stop_tokens: frozenset[int] = frozenset()
        """End-of-turn tokens that llama.cpp does not mark end-of-generation."""
        self.end_of_turn: str | None = None
        self._bias: Any = None  # ctypes array of llama_logit_bias
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
        assert self.model_file is not None
        log.info(
            "model_loaded",
            model=self.model,
            path=str(self.model_file.path),
            sha256=self.model_file.sha256[:12],
            n_ctx=self.n_ctx,
            n_gpu_layers=self._n_gpu_layers,
            chat_template=self._formatter is not None,
            end_of_turn=self.end_of_turn,
            extra_stop_tokens=sorted(self._stop_tokens),
            load_ms=round((time.perf_counter() - started) * 1000, 1),
        )

    async def close(self) -> None:
        if self._active is not None:
            self._active.abandoned = True
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._free)
        self._executor.shutdown(wait=False)

    def _load(self) -> None:
        llama_cpp.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))
        if self.model_file is None:
            path = self._model_path
            self.model_file = resolve_model(BUILTIN) if path is None else model_file(path)
        llm = llama_cpp.Llama(
            model_path=str(self.model_file.path),
            n_ctx=self.n_ctx,
            n_batch=self._n_batch,
            n_ubatch=self._n_ubatch,
            n_threads=self._n_threads,
            n_threads_batch=self._n_threads,
            n_gpu_layers=self._n_gpu_layers,
            verbose=False,
        )
        self._llm = llm
        self.n_ctx = llm.n_ctx()
        self._vocab = llama_cpp.llama_model_get_vocab(llm.model)
        self._abort_cb = llama_cpp.ggml_abort_callback(self._should_abort)
        template = llm.metadata.get("tokenizer.chat_template")
        if template:
            self._formatter = self._chat_formatter(template, add_generation_prompt=True)
            closing = self._chat_formatter(template, add_generation_prompt=False)
            self.end_of_turn = prompt.end_of_turn(lambda messages: closing(messages=messages).prompt)  # type: ignore[arg-type]
            self._stop_tokens = self._end_of_turn_tokens(self.end_of_turn)
        self._bias = self._banned_token_bias()

    def _chat_formatter(self, template: str, *, add_generation_prompt: bool) -> Jinja2ChatFormatter:
        llm = self._require_llm()
        return Jinja2ChatFormatter(
            template=template,
            eos_token=self._token_text(llm.token_eos()),
            bos_token=self._token_text(llm.token_bos()),
            add_generation_prompt=add_generation_prompt,
        )

    def _end_of_turn_tokens(self, marker: str | None) -> frozenset[int]:
        """The end-of-turn marker's token, when it is one token that llama.cpp does not
        already treat as end-of-generation (for ChatML's `<|im_end|>` it usually does)."""
        if marker is None:
            return frozenset()
        tokens = self._require_llm().tokenize(marker.encode(), add_bos=False, special=True)
        if len(tokens) != 1 or llama_cpp.llama_vocab_is_eog(self._vocab, tokens[0]):
            return frozenset()
        return frozenset(tokens)

    def _free(self) -> None:
        if self._llm is not None:
            self._llm.close()
            self._llm = None
        self._abort_cb = None

    def _banned_token_bias(self) -> Any:
        """-inf bias for byte-fallback and control tokens, except those that end the answer."""
        banned = [
            tok
            for tok in range(llama_cpp.llama_vocab_n_tokens(self._vocab))
            if llama_cpp.llama_vocab_get_attr(self._vocab, tok) & _BANNED_ATTRS
            and not self._ends_answer(tok)
        ]
        array = (llama_cpp.llama_logit_bias * len(banned))()
        for slot, tok in zip(array, banned):
            slot.token = tok
            slot.bias = float("-inf")
        return array

    def _token_text(self, tok: int) -> str:
        if tok < 0:
            return ""
        return bytes(llama_cpp.llama_vocab_get_text(self._vocab, tok)).decode("utf-8")

    def _should_abort(self, _data: object) -> bool:
        """llama.cpp's abort callback: called between graph nodes while a prompt is evaluated."""
        job = self._active
        if job is None or not job.stopped:
            return False
        _thread_state.aborting = True  # llama.cpp calls this on the thread that decodes
        return True

    # prompt

    def format_prompt(self, messages: list[prompt.Message]) -> str:
        """The prompt text: the model's chat template, else a plain User/Assistant form."""
        if self._formatter is not None:
            return self._formatter(messages=messages).prompt  # type: ignore[arg-type]
        lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
        return "\n".join(lines) + "\nAssistant:"

    def _tokenize_prompt(self, messages: list[prompt.Message]) -> list[int]:
        llm = self._require_llm()
        tokens = llm.tokenize(self.format_prompt(messages).encode("utf-8"), add_bos=False, special=True)
        bos = llm.token_bos()
        wants_bos = bos >= 0 and llama_cpp.llama_vocab_get_add_bos(self._vocab)
        if wants_bos and (not tokens or tokens[0] != bos):
            tokens.insert(0, bos)
        return tokens

    def _fit_prompt(self, request: GenerationRequest, stats: GenerationStats) -> list[int]:
        """The latest turns that fit (`worker.prompt.fit`), as tokens; `PromptTooLong` if the
        current turn alone does not."""
        rendered: dict[int, list[int]] = {}

        def measure(messages: list[prompt.Message]) -> int:
            tokens = self._tokenize_prompt(messages)
            rendered[len(messages)] = tokens
            return len(tokens)

        budget = prompt.prompt_budget(self.n_ctx, request.max_tokens)
        system = self._system_prompt if request.system is None else request.system
        fitted = prompt.fit(request.history, request.text, system, measure, budget, self.n_ctx)
        stats.history_dropped = fitted.dropped
        return rendered[len(fitted.messages)]

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
        tokens = self._fit_prompt(job.request, job.stats)
        job.stats.prompt_tokens = len(tokens)
        if job.stopped:
            return
        job.token.set_phase(Phase.PROMPT)
        exact = temperature <= 0 or seed is not None
        if not self._eval_prompt(job, self._reuse_prefix(tokens, exact)):
            return
        job.token.set_phase(Phase.GENERATING)
        sampler = self._new_sampler(temperature, seed)
        try:
            self._decode_loop(job, sampler)
        finally:
            llama_cpp.llama_sampler_free(sampler)

    def _decode_loop(self, job: _Job, sampler: Any) -> None:
        llm = self._require_llm()
        stats = job.stats
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        started = False  # strip the leading space of the reply
        buf = ctypes.create_string_buffer(256)
        while True:
            if job.stopped:
                return
            if stats.generated_tokens >= job.request.max_tokens or llm.n_tokens >= self.n_ctx:
                self._finish(job, "length", decoder.decode(b"", final=True))
                return
            tok = llama_cpp.llama_sampler_sample(sampler, llm.ctx, -1)
            if self._ends_answer(tok):
                self._finish(job, "stop", decoder.decode(b"", final=True))
                return
            stats.generated_tokens += 1
            size = llama_cpp.llama_token_to_piece(self._vocab, tok, buf, len(buf), 0, False)
            if size < 0:
                raise RuntimeError(f"token {tok} piece longer than {len(buf)} bytes")
            piece = decoder.decode(buf.raw[:size])
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
        llm = self._require_llm()
        limit = max(0, min(llm.n_tokens, len(tokens) - 1))  # evaluate one token at least
        differs = np.flatnonzero(llm.input_ids[:limit] != np.asarray(tokens[:limit]))
        common = int(differs[0]) if differs.size else limit
        keep = prompt.reuse_length(common, self._canonical, self._n_ubatch, exact)
        memory = llama_cpp.llama_get_memory(llm.ctx)
        if keep and not llama_cpp.llama_memory_seq_rm(memory, -1, keep, -1):
            keep = 0
        if not keep:
            self._reset_context()
        llm.n_tokens = keep
        self._canonical = prompt.canonical_after(keep, self._canonical, len(tokens), self._n_ubatch)
        return tokens[keep:]

    def _reset_context(self) -> None:
        llm = self._require_llm()
        llm.n_tokens = 0
        self._canonical = 0
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm.ctx), True)

    def _eval_prompt(self, job: _Job, tokens: list[int]) -> bool:
        """`_eval` with llama.cpp's abort callback attached, so a cancel stops a long prompt
        evaluation. llama.cpp calls it after every graph node, and a Python callback takes the
        GIL each time (dozens of times per token: docs/PERFORMANCE.md): it is detached for
        decoding, where the cancel flag is read after every token."""
        llm = self._require_llm()
        llama_cpp.llama_set_abort_callback(llm.ctx, self._abort_cb, None)
        try:
            return self._eval(job, tokens)
        finally:
            llama_cpp.llama_set_abort_callback(llm.ctx, _NO_ABORT_CALLBACK, None)

    def _eval(self, job: _Job, tokens: list[int]) -> bool:
        """Evaluate `tokens`; False when the abort callback stopped it for a cancel."""
        try:
            self._require_llm().eval(tokens)
        except RuntimeError as exc:
            if not (job.stopped and str(exc) == _ABORTED):
                raise
            if job.token.phase is Phase.PROMPT:
                job.stats.prefill_aborted = True
            self._reset_context()  # the aborted batch may have left partial state behind
            return False
        finally:
            _thread_state.aborting = False
        return True

    def _ends_answer(self, tok: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, tok)) or tok in self._stop_tokens

    def _sampling(self, request: GenerationRequest) -> tuple[float, int | None]:
        """(temperature, seed): the request's, else the engine's."""
        temperature = self._temperature if request.temperature is None else request.temperature
        return temperature, self._seed if request.seed is None else request.seed

    def _new_sampler(self, temperature: float, seed: int | None) -> Any:
        """Banned tokens, then greedy (temperature 0) or top-k, top-p, min-p, temperature and a
        seeded draw."""
        chain = llama_cpp.llama_sampler_chain_init(
            llama_cpp.llama_sampler_chain_default_params()
        )
        stages = [
            llama_cpp.llama_sampler_init_logit_bias(
                llama_cpp.llama_vocab_n_tokens(self._vocab), len(self._bias), self._bias
            ),
        ]
        if temperature <= 0:
            stages.append(llama_cpp.llama_sampler_init_greedy())
        else:
            top_k, top_p, min_p = self._cutoffs
            stages += [
                llama_cpp.llama_sampler_init_top_k(top_k),
                llama_cpp.llama_sampler_init_top_p(top_p, 1),
                llama_cpp.llama_sampler_init_min_p(min_p, 1),
                llama_cpp.llama_sampler_init_temp(temperature),
                llama_cpp.llama_sampler_init_dist(llama_seed(seed)),
            ]
        for stage in stages:
            llama_cpp.llama_sampler_chain_add(chain, stage)
        return chain

    def _require_llm(self) -> llama_cpp.Llama:
        if self._llm is None:
            raise RuntimeError("LlamaEngine is not started (or already closed)")
        return self._llm


def llama_seed(seed: int | None) -> int:
    """llama.cpp seeds are 32-bit and 0xFFFFFFFF means "random": any other integer maps into
    0..0xFFFFFFFE."""
    return llama_cpp.LLAMA_DEFAULT_SEED if seed is None else seed % llama_cpp.LLAMA_DEFAULT_SEED
