"""One generation: engine tokens → coalesced chunks → fenced log writes → one terminal event."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Literal

import structlog

from protocol import coalesce
from protocol.coalesce import Coalescer
from protocol.jobs import Job
from protocol.messages import Cancelled, Chunk, Done, Error, Terminal, encode_text
from store import keys
from store.redis_store import Append, Ending, Store, retry
from worker import metrics
from worker.cancel_token import CancelToken
from worker.engines.base import Engine, Finish, GenerationRequest, Turn
from worker.writer import ChunkWriter

log = structlog.get_logger("worker.job")


@dataclass(slots=True)
class Running:
    """A job this worker is generating."""

    job: Job
    attempt: int
    token: CancelToken = field(default_factory=CancelToken)
    lost: bool = False
    """Set when a fenced write was refused: another worker owns the job now."""
    cancel_source: str | None = None
    """How a user's cancel reached this worker (`push`, `catch_up`), for the job's log line."""


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


Outcome = Literal["done", "cancelled", "error", "lost"]
SHUTDOWN = "shutdown"
"""Cancel reason used when a draining worker runs out of time: not the user's Stop."""
_STATE_OF: dict[type, Literal["done", "cancelled", "error"]] = {
    Done: "done",
    Cancelled: "cancelled",
    Error: "error",
}


async def run_job(services: JobServices, running: Running, start_seq: int = 0) -> Outcome:
    job, token = running.job, running.token
    structlog.contextvars.bind_contextvars(message_id=job.message_id, session_id=job.session_id)
    loop = asyncio.get_running_loop()
    history: list[Turn] = []
    if services.with_history:
        history = [
            Turn(role, text)  # type: ignore[arg-type]
            for role, text, _mid in await services.store.session_turns(
                job.user, job.session_id, before=job.message_id
            )
        ]
    request = GenerationRequest(job.message_id, job.text, job.max_tokens, history)
    coalescer = Coalescer(window_s=0.0 if services.engine.coalesces else services.coalesce_window_s)
    seq = start_seq
    chunks: list[str] = []
    """Text of each chunk, seq `start_seq + 1` onwards."""
    stored_seq = start_seq
    """The highest seq the store accepted: after a cancel ended the message in the store,
    later chunks are refused, and the saved answer is the text the client saw."""
    writing = 0
    """Chunk writes not answered yet."""
    drained: asyncio.Future[None] | None = None
    timer: asyncio.TimerHandle | None = None
    after_cancel = 0
    polls: list[asyncio.Future[None]] = []

    def on_written(chunk_seq: int, outcome: Append | BaseException) -> None:
        nonlocal stored_seq, writing
        writing -= 1
        match outcome if isinstance(outcome, str) else "not_ours":
            case "written":
                stored_seq = max(stored_seq, chunk_seq)
            case "cancelled":
                token.cancel("cancel")
            case "not_ours":
                running.lost = True
                token.cancel("fenced")
        if writing == 0 and drained is not None and not drained.done():
            drained.set_result(None)

    async def poll_cancel_key() -> None:
        if await services.store.redis.exists(keys.cancel_key(job.message_id)):
            token.cancel("cancel")

    def emit(chunk: str | None) -> None:
        nonlocal seq, writing
        if chunk is None:
            return
        seq += 1
        if services.poll_every_chunks and seq % services.poll_every_chunks == 0:
            polls.append(asyncio.ensure_future(poll_cancel_key()))
        chunks.append(chunk)
        frame = encode_text(Chunk(message_id=job.message_id, seq=seq, text=chunk))
        writing += 1
        services.writer.append(job.message_id, running.attempt, seq, frame, on_written)

    def on_deadline() -> None:
        nonlocal timer
        timer = None
        emit(coalescer.due(loop.time()))
        arm()

    def arm() -> None:
        nonlocal timer
        deadline = coalescer.deadline()
        if deadline is not None and timer is None:
            timer = loop.call_at(deadline, on_deadline)

    finish: Finish | None = None
    failure: str | None = None
    try:
        async for item in services.engine.generate(request, token):
            if isinstance(item, Finish):
                finish = item
                break
            if token.cancelled:
                after_cancel += 1
            emit(coalescer.add(item, loop.time()))
            arm()
            if services.writer.full:
                await services.writer.room()
    except Exception as exc:  # an engine failure ends this message, not the worker
        log.exception("engine_failed")
        failure = f"generation failed: {type(exc).__name__}"
    finally:
        if timer is not None:
            timer.cancel()
    emit(coalescer.take(loop.time()))
    await asyncio.gather(*polls, return_exceptions=True)
    if writing:
        drained = loop.create_future()
        await drained
    if token.cancelled:
        metrics.TOKENS_AFTER_CANCEL.observe(after_cancel)
    if running.lost:
        log.warning("job_lost", attempt=running.attempt)
        return "lost"
    terminal: Terminal
    if failure is not None:
        terminal = Error(code="internal", message=failure, message_id=job.message_id, seq=seq)
    elif token.reason == SHUTDOWN:
        terminal = Error(
            code="worker_lost",
            message="the worker shut down before the answer was complete",
            message_id=job.message_id,
            seq=seq,
        )
    elif token.cancelled:
        terminal = Cancelled(message_id=job.message_id, seq=seq)
    elif finish is not None:
        terminal = Done(message_id=job.message_id, seq=seq, finish_reason=finish.reason)
    else:
        terminal = Error(
            code="internal", message="engine ended without finishing", message_id=job.message_id, seq=seq
        )
    state = _STATE_OF[type(terminal)]
    ending = await finish_with_retry(
        services.store, services.worker_id, job.message_id, running.attempt,
        state, seq, encode_text(terminal), "".join(chunks[: stored_seq - start_seq]), user=job.user,
    )
    match ending:
        case "not_ours":
            running.lost = True
            return "lost"
        case "ended_cancelled" | "cancelled_before":
            state = "cancelled"
    log.info(
        "job_finished",
        outcome=state,
        seq=seq,
        attempt=running.attempt,
        cancel_reason=token.reason or None,
        cancel_source=running.cancel_source,
        cancel_phase=token.phase_at_cancel.value if token.phase_at_cancel else None,
        tokens_after_cancel=after_cancel if token.cancelled else None,
    )
    return state


async def finish_with_retry(
    store: Store,
    worker_id: str,
    message_id: str,
    attempt: int,
    state: Literal["done", "cancelled", "error"],
    seq: int,
    frame: str,
    text: str,
    *,
    user: str,
) -> Ending:
    """The terminal event must land: retried while Redis is unreachable."""
    return await retry(
        lambda: store.finish(message_id, worker_id, attempt, state, seq, frame, text, user=user), "finish"
    )
