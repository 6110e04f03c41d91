"""One generation: engine tokens → coalesced chunks → fenced log writes → one terminal event.

The steps are `build_request` (the prompt and the session's history), `generate` (engine
pieces through the coalescer into `ChunkStream`), then `end` (the terminal, written however
long Redis refuses it). What the store accepted and how the message ends are decided by the
pure `worker.progress`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Literal

import structlog

from protocol import coalesce
from protocol.coalesce import Coalescer
from protocol.jobs import Job
from protocol.messages import Chunk, Error, ErrorCode, FinishReason, Terminal, encode_text, state_of
from store import DeadlinePassed, NotReplicated, keys
from store.redis_store import Append, Ending, Store
from store.retry import retry
from worker import PromptTooLong, metrics, prompt
from worker.cancel_token import CancelToken
from worker.engines.base import Engine, Finish, GenerationRequest, Turn
from worker.progress import UNAVAILABLE, Progress, Stop, terminal_event
from worker.writer import ChunkWriter

log = structlog.get_logger("worker.job")


@dataclass(slots=True)
class Running:
    """A job this worker is generating."""

    job: Job
    attempt: int
    token: CancelToken = field(default_factory=CancelToken)
    cancel_source: str | None = None
    """How a user's cancel reached this worker (`push`, `catch_up`, `refused_write`: a chunk
    write refused because the store had ended the message), for the job's log line."""


@dataclass(frozen=True, slots=True)
class Taken:
    """A job claimed or taken over by this worker, to run as it is."""

    attempt: int
    job: Job
    start_seq: int = 0


@dataclass(frozen=True, slots=True)
class JobServices:
    store: Store
    writer: ChunkWriter
    engine: Engine
    worker_id: str
    coalesce_window_s: float = coalesce.WINDOW_S
    with_history: bool = False
    poll_every_chunks: int = 0
    """Baseline for benchmarks only: check the cancel key every N chunks (the usual fix),
    instead of the pushed cancel. 0 (the default): pushed cancels, no Redis call per token."""
    redis_deadline_s: float = 30.0
    """How long a terminal write may be refused before it becomes `error` / `unavailable`."""


Outcome = Literal["done", "cancelled", "error", "lost"]


async def run_job(services: JobServices, running: Running, start_seq: int = 0) -> Outcome:
    job = running.job
    structlog.contextvars.bind_contextvars(message_id=job.message_id, session_id=job.session_id)
    progress = Progress(start_seq)
    request = await build_request(services, job)
    stream = ChunkStream(services, running, progress)
    finish, failure, after_cancel = await generate(services.engine, request, running.token, stream)
    await stream.drained()
    if running.token.cancelled:
        metrics.TOKENS_AFTER_CANCEL.observe(after_cancel)
    if progress.lost:
        log.warning("job_lost", attempt=running.attempt)
        return "lost"
    terminal = terminal_event(job.message_id, failure=failure, cancel_reason=running.token.reason, finish=finish)
    ending = await end(
        services.store, services.worker_id, running.attempt, job, terminal, progress.answer, services.redis_deadline_s
    )
    state: Outcome
    match ending:
        case "not_ours":
            log.warning("job_lost", attempt=running.attempt)
            return "lost"
        case "ended_cancelled" | "cancelled_before":
            state = "cancelled"
        case "ended":
            state = state_of(terminal)
    log.info(
        "job_finished",
        outcome=state,
        seq=progress.stored_seq,
        attempt=running.attempt,
        cancel_reason=running.token.reason or None,
        cancel_source=running.cancel_source,
        cancel_phase=running.token.phase_at_cancel.value if running.token.phase_at_cancel else None,
        tokens_after_cancel=after_cancel if running.token.cancelled else None,
    )
    return state


async def build_request(services: JobServices, job: Job) -> GenerationRequest:
    """The engine's request: the job's own conversation when it carries one, else the
    session's history (engines that use it)."""
    history: list[Turn] = []
    system: str | None = None
    if job.conversation is not None:
        system, history = prompt.from_conversation(job.conversation)
    elif services.with_history:
        turns = await retry(
            lambda: services.store.session_turns(job.user, job.session_id, before=job.message_id),
            "history",
            deadline_s=services.redis_deadline_s,
        )
        history = [Turn(t.role, t.text, "cancelled" if t.status == "cancelled" else "complete") for t in turns]
    return GenerationRequest(
        job.message_id, job.text, job.max_tokens, history, temperature=job.temperature, seed=job.seed, system=system
    )


async def generate(
    engine: Engine, request: GenerationRequest, token: CancelToken, stream: ChunkStream
) -> tuple[FinishReason | None, tuple[ErrorCode, str] | None, int]:
    """Run the engine into `stream`: (finish reason, failure, tokens after the cancel)."""
    finish: FinishReason | None = None
    failure: tuple[ErrorCode, str] | None = None
    after_cancel = 0
    try:
        async for item in engine.generate(request, token):
            if isinstance(item, Finish):
                finish = item.reason
                break
            if token.cancelled:
                after_cancel += 1
            stream.add(item)
            await stream.room()
    except PromptTooLong as exc:  # PROTOCOL.md: "text too long" is bad_request; resending fails alike
        log.info("prompt_too_long", tokens=exc.tokens, budget=exc.budget)
        failure = ("bad_request", str(exc))
    except Exception as exc:  # an engine failure ends this message, not the worker
        log.exception("engine_failed")
        failure = ("internal", f"generation failed: {type(exc).__name__}")
    finally:
        stream.flush()
    return finish, failure, after_cancel


async def end(
    store: Store, worker_id: str, attempt: int, job: Job, terminal: Terminal, text: str, deadline_s: float
) -> Ending:
    """Write the terminal event of `job`'s message (fenced by worker and attempt). Refused
    past `deadline_s`, the message ends `error` / `unavailable` instead, written whenever Redis
    lets it. An end written but on no replica yet (`NotReplicated`) is not refused: it is
    tried again, unchanged, until a replica has it."""
    mid, user, sid = job.message_id, job.user, job.session_id
    try:
        return await retry(
            lambda: store.finish(mid, worker_id, attempt, terminal, text, user=user, session_id=sid),
            "finish",
            deadline_s=deadline_s,
        )
    except DeadlinePassed as exc:
        log.error("finish_refused", error=str(exc))
        if isinstance(exc.__cause__, NotReplicated):
            return await retry(
                lambda: store.finish(mid, worker_id, attempt, terminal, text, user=user, session_id=sid), "finish"
            )
    unavailable = Error(code="unavailable", message="the message store refused writes for too long",
                        message_id=mid, seq=0)
    return await retry(
        lambda: store.finish(mid, worker_id, attempt, unavailable, text, user=user, session_id=sid), "finish"
    )


class ChunkStream:
    """Pieces → coalesced chunks → the chunk writer, with what came of each write."""

    def __init__(self, services: JobServices, running: Running, progress: Progress) -> None:
        self._services = services
        self._running = running
        self._progress = progress
        self._loop = asyncio.get_running_loop()
        window = 0.0 if services.engine.coalesces else services.coalesce_window_s
        self._coalescer = Coalescer(window_s=window)
        self._timer: asyncio.TimerHandle | None = None
        self._drained: asyncio.Future[None] | None = None
        self._polls: list[asyncio.Future[None]] = []

    def add(self, piece: str) -> None:
        self._emit(self._coalescer.add(piece, self._loop.time()))
        self._arm()

    async def room(self) -> None:
        if self._services.writer.full:
            await self._services.writer.room()

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._emit(self._coalescer.take(self._loop.time()))

    async def drained(self) -> None:
        """Every chunk write answered (and every cancel-key poll of the baseline done)."""
        await asyncio.gather(*self._polls, return_exceptions=True)
        if self._progress.writing:
            self._drained = self._loop.create_future()
            await self._drained

    def _emit(self, chunk: str | None) -> None:
        if chunk is None:
            return
        seq = self._progress.next_chunk(chunk)
        if seq is None:
            return
        job = self._running.job
        every = self._services.poll_every_chunks
        if every and seq % every == 0:
            self._polls.append(asyncio.ensure_future(self._poll_cancel_key()))
        frame = encode_text(Chunk(message_id=job.message_id, seq=seq, text=chunk))
        self._services.writer.append(job.message_id, self._running.attempt, seq, frame, self._written, self._earlier)

    def _earlier(self, seq: int) -> str | None:
        """The frame of an earlier chunk of this generation (to write again after a store
        lost it), or None for one it did not write."""
        text = self._progress.text_of(seq)
        return None if text is None else encode_text(Chunk(message_id=self._running.job.message_id, seq=seq, text=text))

    def _written(self, seq: int, outcome: Append | BaseException) -> None:
        stop = self._progress.written(seq, outcome)
        if stop is not Stop.GO_ON:
            if stop.value == UNAVAILABLE:
                log.error("chunk_write_failed", seq=seq, error=str(outcome))
            if self._running.token.cancel(stop.value) and stop is Stop.CANCELLED:
                self._running.cancel_source = "refused_write"  # the store ended it before the push came
        if not self._progress.writing and self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def _on_deadline(self) -> None:
        self._timer = None
        self._emit(self._coalescer.due(self._loop.time()))
        self._arm()

    def _arm(self) -> None:
        deadline = self._coalescer.deadline()
        if deadline is not None and self._timer is None:
            self._timer = self._loop.call_at(deadline, self._on_deadline)

    async def _poll_cancel_key(self) -> None:
        if await self._services.store.redis.exists(keys.cancel_key(self._running.job.message_id)):
            self._running.token.cancel("cancel")
