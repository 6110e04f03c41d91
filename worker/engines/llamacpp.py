"""The one adapter around llama.cpp's C API (llama-cpp-python's low-level ctypes bindings).

Everything the llama engines ask of llama.cpp's C functions goes through here: loading a model,
its vocabulary and chat format (template, end-of-turn stop, banned tokens), one context
holding several sequences (`n_seq_max`, each with its own KV stream), `llama_batch` building,
`llama_decode` with its return codes, per-sequence sampler chains, removing one sequence's KV
cells (`llama_memory_seq_rm`) or moving them to another sequence (`llama_memory_seq_cp`), token
pieces and end-of-generation checks, requantizing a GGUF, and llama.cpp's log lines routed into
`logging`. The high-level `Llama` class has no
multi-sequence API, so this uses the C functions llama.h documents; the behaviour relied on is
pinned by tests/integration/test_llamacpp_adapter.py.

Objects here are not thread-safe: one thread owns a `Model`, its `Context`s, `Batch`es and
`Sampler`s.
"""

from __future__ import annotations

import ctypes
import enum
import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import llama_cpp
import numpy as np
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from worker import prompt
from worker.cpus import available_cpus
from worker.engines.base import GenerationRequest

if TYPE_CHECKING:  # worker.model imports this module (the Q4_0 copy of the default model)
    from worker.model.choice import ModelFile

_log = logging.getLogger("tokenrelay.llama_cpp")
_GGML_LOG_LEVELS = {3: logging.WARNING, 4: logging.ERROR}  # ggml: 1 DEBUG, 2 INFO, 3 WARN, 4 ERROR, 5 CONT
_thread_state = threading.local()


def _on_llama_log(level: int, text: bytes, _user_data: object) -> None:
    """llama.cpp log lines → `logging` (llama-cpp-python's own hook maps an older ggml level
    enum and prints warnings to stderr even with verbose=False)."""
    py_level = _GGML_LOG_LEVELS.get(level, logging.DEBUG)
    if getattr(_thread_state, "quiet", False):
        py_level = logging.DEBUG
    if _log.isEnabledFor(py_level):
        _log.log(py_level, "%s", text.decode("utf-8", errors="replace").rstrip())


_LOG_CALLBACK = llama_cpp.llama_log_callback(_on_llama_log)
"""Module-level: llama.cpp keeps the bare function pointer, so the ctypes object must live on."""

_BANNED_ATTRS = (
    llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN
    | llama_cpp.LLAMA_TOKEN_ATTR_UNUSED
    | llama_cpp.LLAMA_TOKEN_ATTR_CONTROL
    | llama_cpp.LLAMA_TOKEN_ATTR_BYTE
)


class LlamaCppError(RuntimeError):
    """llama.cpp refused or failed a call."""


class DecodeStatus(enum.IntEnum):
    """`llama_decode`'s documented return codes (llama.h)."""

    OK = 0
    NO_KV_SLOT = 1
    """No room in the KV cache for the batch; the memory is as before the call."""
    ABORTED = 2
    INVALID_BATCH = -1


class DecodeError(LlamaCppError):
    def __init__(self, code: int) -> None:
        try:
            name = DecodeStatus(code).name
        except ValueError:
            name = "FATAL"
        super().__init__(f"llama_decode returned {code} ({name})")
        self.code = code


def thread_counts(n_threads: int | None = None) -> tuple[int, int]:
    """(threads for a one-token batch, threads for larger ones): `n_threads` for both if given,
    else as llama-cpp-python's `Llama` chooses them but from the CPUs this process may use
    (`worker.cpus`: affinity and a container's CPU limit): half of them, and all of them.
    Decoding one sequence's token is too little work to share out (on this 2-core machine one
    thread did it faster than two); a batch of several sequences' tokens, or of prompt tokens,
    is not."""
    if n_threads:
        return n_threads, n_threads
    cpus = available_cpus()
    return max(1, cpus // 2), cpus


def route_logs() -> None:
    """Send llama.cpp's log lines (hundreds per context creation) to `logging`, not stderr."""
    llama_cpp.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))


def quiet_logs(quiet: bool) -> None:
    """While set on a thread, llama.cpp's lines logged from it are DEBUG: for a decode that
    thread aborts on purpose (llama.cpp notes that it drops the aborted batch)."""
    _thread_state.quiet = quiet


def model_chat_template(model: Any) -> str | None:
    """A loaded model's default chat template (GGUF `tokenizer.chat_template`), if it has one."""
    raw = llama_cpp.llama_model_chat_template(model, None)
    return raw.decode("utf-8") if raw else None


class Vocab:
    """A loaded model's vocabulary: tokenizing, token pieces, end-of-generation tokens."""

    def __init__(self, vocab: Any) -> None:
        self.vocab: Any = vocab
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(vocab))
        self.bos = int(llama_cpp.llama_vocab_bos(vocab))
        self.eos = int(llama_cpp.llama_vocab_eos(vocab))
        self.adds_bos = self.bos >= 0 and bool(llama_cpp.llama_vocab_get_add_bos(vocab))
        self._piece = ctypes.create_string_buffer(256)

    def tokenize(self, text: str, *, special: bool = True) -> list[int]:
        """`text` as tokens, without BOS; `special`: `<|im_start|>` and the like are tokens."""
        data = text.encode("utf-8")
        size = len(data) + 8
        for _ in range(2):
            array = (llama_cpp.llama_token * size)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), array, size, False, special)
            if n >= 0:
                return list(array[:n])
            size = -n
        raise LlamaCppError(f"llama_tokenize wanted {size} tokens twice")

    def with_bos(self, tokens: list[int]) -> list[int]:
        """`tokens` with the BOS the model's vocabulary asks for, unless they start with it."""
        if self.adds_bos and (not tokens or tokens[0] != self.bos):
            return [self.bos, *tokens]
        return tokens

    def piece(self, token: int) -> bytes:
        """The bytes of one token's text (may be part of a UTF-8 character)."""
        n = llama_cpp.llama_token_to_piece(self.vocab, token, self._piece, len(self._piece), 0, False)
        if n < 0:
            raise LlamaCppError(f"token {token}'s piece is longer than {len(self._piece)} bytes")
        return self._piece.raw[:n]

    def token_text(self, token: int) -> str:
        """The vocabulary entry of a token as stored (`<|im_end|>`, `<s>`); '' for -1."""
        if token < 0:
            return ""
        return bytes(llama_cpp.llama_vocab_get_text(self.vocab, token)).decode("utf-8")

    def is_eog(self, token: int) -> bool:
        """An end-of-generation token (EOS, EOT, `<|im_end|>` when the vocabulary says so)."""
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    def unprintable(self, keep: Iterable[int] = ()) -> list[int]:
        """Control, byte-fallback, unknown and unused tokens, except end-of-generation ones and
        `keep`: what a sampler should never pick for text."""
        kept = set(keep)
        return [
            tok
            for tok in range(self.n_vocab)
            if llama_cpp.llama_vocab_get_attr(self.vocab, tok) & _BANNED_ATTRS
            and not self.is_eog(tok)
            and tok not in kept
        ]


class Model(Vocab):
    """Weights and vocabulary of one GGUF file."""

    def __init__(self, path: str | os.PathLike[str], *, n_gpu_layers: int = 0) -> None:
        route_logs()
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        model = llama_cpp.llama_model_load_from_file(os.fsencode(path), params)
        if not model:
            raise LlamaCppError(f"llama.cpp could not load {path}")
        self.path = Path(path)
        self.ptr: Any = model
        super().__init__(llama_cpp.llama_model_get_vocab(model))

    def close(self) -> None:
        if self.ptr:
            llama_cpp.llama_model_free(self.ptr)
            self.ptr = None

    def description(self) -> str:
        """llama.cpp's one-line description: architecture, size and weight type
        ("llama ?B Q4_0")."""
        buf = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_model_desc(self.ptr, buf, len(buf))
        return buf.raw[: max(n, 0)].decode("utf-8", errors="replace")

    def chat_template(self) -> str | None:
        return model_chat_template(self.ptr)


class ChatFormat:
    """How prompts for one model are written and where its answers end.

    Prompts use the model's own chat template (through llama-cpp-python's
    `Jinja2ChatFormatter`), else `prompt.plain_form`. An answer ends at an end-of-generation
    token, and at the template's end-of-turn token too when llama.cpp does not mark it as one.
    `banned`: control and byte-fallback tokens no answer may contain (those that end one are
    allowed)."""

    def __init__(self, vocab: Vocab, template: str | None) -> None:
        self.vocab = vocab
        self._formatter: Jinja2ChatFormatter | None = None
        self.end_of_turn: str | None = None
        self.stop_tokens: frozenset[int] = frozenset()
        """End-of-turn tokens that llama.cpp does not mark end-of-generation."""
        if template:
            self._formatter = self._chat_formatter(template, add_generation_prompt=True)
            closing = self._chat_formatter(template, add_generation_prompt=False)
            self.end_of_turn = prompt.end_of_turn(lambda messages: closing(messages=messages).prompt)  # type: ignore[arg-type]
            self.stop_tokens = self._end_of_turn_tokens(self.end_of_turn)
        self.banned = vocab.unprintable(keep=self.stop_tokens)

    def _chat_formatter(self, template: str, *, add_generation_prompt: bool) -> Jinja2ChatFormatter:
        return Jinja2ChatFormatter(
            template=template,
            eos_token=self.vocab.token_text(self.vocab.eos),
            bos_token=self.vocab.token_text(self.vocab.bos),
            add_generation_prompt=add_generation_prompt,
        )

    def _end_of_turn_tokens(self, marker: str | None) -> frozenset[int]:
        """The end-of-turn marker's token, when it is one token that llama.cpp does not
        already treat as end-of-generation (for ChatML's `<|im_end|>` it usually does)."""
        if marker is None:
            return frozenset()
        tokens = self.vocab.tokenize(marker)
        if len(tokens) != 1 or self.vocab.is_eog(tokens[0]):
            return frozenset()
        return frozenset(tokens)

    @property
    def has_template(self) -> bool:
        return self._formatter is not None

    def render(self, messages: list[prompt.Message]) -> str:
        if self._formatter is not None:
            return self._formatter(messages=messages).prompt  # type: ignore[arg-type]
        return prompt.plain_form(messages)

    def tokens(self, messages: list[prompt.Message]) -> list[int]:
        return self.vocab.with_bos(self.vocab.tokenize(self.render(messages)))

    def fit(self, request: GenerationRequest, n_ctx: int, system: str | None) -> tuple[list[int], int]:
        """(prompt tokens, earlier exchanges left out): the latest turns that fit a context of
        `n_ctx` (`prompt.fit`), with the request's system prompt, else `system`;
        `PromptTooLong` if the current turn alone does not fit."""
        rendered: dict[int, list[int]] = {}

        def measure(messages: list[prompt.Message]) -> int:
            rendered[len(messages)] = self.tokens(messages)
            return len(rendered[len(messages)])

        budget = prompt.prompt_budget(n_ctx, request.max_tokens)
        chosen = system if request.system is None else request.system
        fitted = prompt.fit(request.history, request.text, chosen, measure, budget, n_ctx)
        return rendered[len(fitted.messages)], fitted.dropped

    def ends_answer(self, token: int) -> bool:
        return self.vocab.is_eog(token) or token in self.stop_tokens


def log_model_loaded(log: Any, model: ModelFile, chat: ChatFormat, started: float, **fields: object) -> None:
    """The engines' one `model_loaded` line: which file (its sha256), how prompts end."""
    log.info(
        "model_loaded",
        model=model.name,
        path=str(model.path),
        sha256=model.sha256[:12],
        **fields,
        chat_template=chat.has_template,
        end_of_turn=chat.end_of_turn,
        extra_stop_tokens=sorted(chat.stop_tokens),
        load_ms=round((time.perf_counter() - started) * 1000, 1),
    )


class LlamaPrefix:
    """What a high-level `llama_cpp.Llama` holds in its KV cache, for the one-at-a-time engine.

    `Llama` records the tokens it evaluated (`n_tokens`, `input_ids`) and `eval` continues after
    them, dropping the KV cells behind (`llama_memory_seq_rm` from `n_tokens`). It has no method
    to keep only a prefix (`reset` drops all), so the engine's prefix reuse sets `n_tokens`
    here, the one place; and `Llama.eval` reports llama.cpp's abort (decode code 2) only as a
    RuntimeError naming the code. tests/integration/test_llamacpp_adapter.py pins both."""

    ABORTED = f"llama_decode returned {int(DecodeStatus.ABORTED)}"

    def __init__(self, llm: llama_cpp.Llama) -> None:
        self._llm = llm

    @property
    def ctx(self) -> Any:
        """The raw `llama_context` pointer (what `Sampler.sample` and abort callbacks take)."""
        return self._llm.ctx

    @property
    def length(self) -> int:
        """Tokens evaluated into the KV cache."""
        return int(self._llm.n_tokens)

    def common_prefix(self, tokens: list[int], limit: int) -> int:
        """How many leading tokens (at most `limit`) the cache already holds as in `tokens`."""
        limit = max(0, min(self.length, limit))
        held = self._llm.input_ids[:limit]
        differs = np.flatnonzero(held != np.asarray(tokens[:limit], dtype=held.dtype))
        return int(differs[0]) if differs.size else limit

    def keep(self, count: int) -> bool:
        """Keep the first `count` tokens; the next `evaluate` continues after them. False (and
        nothing kept) when llama.cpp cannot drop the cells behind them."""
        memory = llama_cpp.llama_get_memory(self.ctx)
        if count and llama_cpp.llama_memory_seq_rm(memory, -1, count, -1):
            self._llm.n_tokens = count
            return True
        self.clear()
        return count == 0

    def clear(self) -> None:
        self._llm.reset()  # type: ignore[no-untyped-call]
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)

    def evaluate(self, tokens: list[int]) -> bool:
        """Evaluate `tokens` after the cache; False when the abort callback stopped it (the
        cache is then cleared: an aborted batch may leave partial state)."""
        try:
            self._llm.eval(tokens)
        except RuntimeError as exc:
            if str(exc) != self.ABORTED:
                raise
            self.clear()
            return False
        return True

    def set_abort(self, callback: Any) -> None:
        """Attach llama.cpp's abort callback (a `ggml_abort_callback`), or detach it (None)."""
        llama_cpp.llama_set_abort_callback(self.ctx, callback or _NO_ABORT_CALLBACK, None)


_NO_ABORT_CALLBACK = llama_cpp.ggml_abort_callback()  # a NULL function pointer: none


class Context:
    """A llama.cpp context whose KV cache holds `n_seq` sequences of `n_ctx_seq` tokens each.

    With `kv_unified=False` every sequence has its own KV stream of `n_ctx / n_seq_max` cells,
    so one sequence can neither use up nor disturb another's room."""

    def __init__(
        self,
        model: Model,
        *,
        n_seq: int,
        n_ctx_seq: int,
        n_batch: int,
        n_threads: int | None = None,
    ) -> None:
        """`n_threads`: for every batch; None: `thread_counts()`."""
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx_seq * n_seq
        params.n_seq_max = n_seq
        params.n_batch = n_batch
        params.n_ubatch = n_batch
        params.n_threads, params.n_threads_batch = thread_counts(n_threads)
        params.no_perf = True
        _set_if_present(params, "kv_unified", False)
        # CPU flash attention gives a sequence slightly different logits depending on what else
        # is in the batch (a greedy answer then depends on the neighbours); without it, it does not.
        _set_if_present(params, "flash_attn_type", getattr(llama_cpp, "LLAMA_FLASH_ATTN_TYPE_DISABLED", 0))
        ctx = llama_cpp.llama_init_from_model(model.ptr, params)
        if not ctx:
            raise LlamaCppError(f"llama.cpp could not create a context for {n_seq} × {n_ctx_seq} tokens")
        self.ptr: Any = ctx
        self.model = model
        self.n_seq = int(llama_cpp.llama_n_seq_max(ctx))
        n_ctx_seq_of = getattr(llama_cpp, "llama_n_ctx_seq", None)  # before it, KV was unified
        self.n_ctx_seq = int(n_ctx_seq_of(ctx)) if n_ctx_seq_of else int(llama_cpp.llama_n_ctx(ctx)) // self.n_seq
        self.n_batch = int(llama_cpp.llama_n_batch(ctx))
        self._memory: Any = llama_cpp.llama_get_memory(ctx)

    def close(self) -> None:
        if self.ptr:
            llama_cpp.llama_free(self.ptr)
            self.ptr = None

    def decode(self, batch: Batch) -> None:
        """Evaluate `batch`; `DecodeError` with llama.cpp's code unless it returned 0."""
        code = int(llama_cpp.llama_decode(self.ptr, batch.raw))
        if code != DecodeStatus.OK:
            raise DecodeError(code)

    def remove(self, seq: int) -> None:
        """Drop every KV cell of sequence `seq` (llama.h: removing a whole sequence never fails)."""
        if not llama_cpp.llama_memory_seq_rm(self._memory, seq, -1, -1):
            raise LlamaCppError(f"llama_memory_seq_rm refused to remove sequence {seq}")

    def move(self, seq: int, to: int) -> None:
        """Move sequence `seq`'s KV cells to the empty sequence `to` (another KV stream: llama.cpp
        copies the whole stream's buffers before the next decode), leaving `seq` empty."""
        llama_cpp.llama_memory_seq_cp(self._memory, seq, to, -1, -1)
        self.remove(seq)

    def positions(self, seq: int) -> int:
        """How many positions sequence `seq` holds in the KV cache (0 when empty)."""
        return int(llama_cpp.llama_memory_seq_pos_max(self._memory, seq)) + 1

    def clear(self) -> None:
        llama_cpp.llama_memory_clear(self._memory, True)


def _set_if_present(params: Any, name: str, value: object) -> None:
    """Set a context parameter that older llama.cpp versions do not have (a ctypes Structure
    would silently take an unknown attribute)."""
    if any(field[0] == name for field in type(params)._fields_):
        setattr(params, name, value)


class Batch:
    """A `llama_batch` of up to `capacity` tokens, each in one sequence."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.raw: Any = llama_cpp.llama_batch_init(capacity, 0, 1)
        self.raw.n_tokens = 0

    def close(self) -> None:
        if self.raw is not None:
            llama_cpp.llama_batch_free(self.raw)
            self.raw = None

    def __len__(self) -> int:
        return int(self.raw.n_tokens)

    def clear(self) -> None:
        self.raw.n_tokens = 0

    def add(self, token: int, pos: int, seq: int, *, logits: bool) -> int:
        """Append one token; returns its index (what `Sampler.sample` takes for its logits)."""
        raw = self.raw
        i = int(raw.n_tokens)
        if i >= self.capacity:
            raise LlamaCppError(f"batch full ({self.capacity} tokens)")
        raw.token[i] = token
        raw.pos[i] = pos
        raw.n_seq_id[i] = 1
        raw.seq_id[i][0] = seq
        raw.logits[i] = logits
        raw.n_tokens = i + 1
        return i


def llama_seed(seed: int | None) -> int:
    """llama.cpp seeds are 32-bit and 0xFFFFFFFF means "random": None is random, any other
    integer maps into 0..0xFFFFFFFE."""
    return int(llama_cpp.LLAMA_DEFAULT_SEED) if seed is None else seed % int(llama_cpp.LLAMA_DEFAULT_SEED)


class Sampler:
    """One sequence's sampler chain: banned tokens, then greedy (temperature 0) or top-k,
    top-p, min-p, temperature and a seeded draw. A chain keeps its own random state, so each
    sequence draws the same tokens whatever else is in the batch."""

    def __init__(
        self,
        vocab: Vocab,
        *,
        banned: list[int],
        temperature: float,
        seed: int | None,
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
    ) -> None:
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        bias = (llama_cpp.llama_logit_bias * len(banned))()
        for slot, tok in zip(bias, banned):
            slot.token = tok
            slot.bias = float("-inf")
        stages = [llama_cpp.llama_sampler_init_logit_bias(vocab.n_vocab, len(banned), bias)]
        if temperature <= 0:
            stages.append(llama_cpp.llama_sampler_init_greedy())
        else:
            stages += [
                llama_cpp.llama_sampler_init_top_k(top_k),
                llama_cpp.llama_sampler_init_top_p(top_p, 1),
                llama_cpp.llama_sampler_init_min_p(min_p, 1),
                llama_cpp.llama_sampler_init_temp(temperature),
                llama_cpp.llama_sampler_init_dist(llama_seed(seed)),
            ]
        for stage in stages:
            llama_cpp.llama_sampler_chain_add(chain, stage)
        self.ptr: Any = chain

    def sample(self, context: Context | Any, index: int) -> int:
        """Draw (and accept) a token from the logits of batch entry `index` of the last decode
        (-1: the last one) of `context`, a `Context` or a bare llama_context pointer."""
        ptr = context.ptr if isinstance(context, Context) else context
        return int(llama_cpp.llama_sampler_sample(self.ptr, ptr, index))

    def close(self) -> None:
        if self.ptr:
            llama_cpp.llama_sampler_free(self.ptr)
            self.ptr = None


QUANT_TYPES = {
    "Q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0,
    "Q4_1": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1,
    "Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
}


def requantize(source: Path, target: Path, kind: str = "Q4_0", threads: int | None = None) -> Path:
    """Write `source`'s weights as `kind` into `target` (`llama_model_quantize`, allowing an
    already quantized source). Written to a temporary file and renamed, so a reader never
    sees half a model and concurrent installers do not clash."""
    route_logs()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_TYPES[kind]
    params.allow_requantize = True
    params.nthread = threads or available_cpus()
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".part", dir=target.parent)
    os.close(fd)
    try:
        code = llama_cpp.llama_model_quantize(os.fsencode(source), os.fsencode(tmp), ctypes.byref(params))
        if code != 0:
            raise LlamaCppError(f"llama_model_quantize {source} → {kind} returned {code}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def requantized_path(source: Path, kind: str = "Q4_0") -> Path:
    """`source` as `kind`, made once next to it (for a model installer): `name.Q4_1.gguf` →
    `name.Q4_0.gguf`. An existing file is trusted (`requantize` only ever renames a whole one
    into place)."""
    stem = source.stem
    base, _, suffix = stem.rpartition(".")
    name = f"{base if base and suffix.upper() in QUANT_TYPES else stem}.{kind}.gguf"
    target = source.with_name(name)
    if target == source:
        return source
    if not target.is_file():
        requantize(source, target, kind)
    return target
