"""Handlers for the requests that touch Redis: chat, cancel, resume."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import structlog

from gateway import metrics
from protocol.jobs import Job
from protocol.messages import Accepted, Cancel, CancelResult, CancelStatus, Chat, Resume
from store import Unavailable
from store.redis_store import Store

if TYPE_CHECKING:
    from gateway.connection import Connection

log = structlog.get_logger("gateway.requests")

SUPERSEDE_ATTEMPTS = 4
GENERATIONS_RETRY_MS = 1_000
"""`retry_after_ms` of a chat refused for the user's concurrent generations: one of them
has to end first, which no clock foretells."""


async def chat(conn: Connection, message: Chat) -> None:
    gw = conn.gw
    job = Job(
        message_id=gw.store.new_message_id(conn.user),
        user=conn.user,
        session_id=message.session_id,
        text=message.text,
        max_tokens=message.max_tokens or gw.config.default_max_tokens,
        request_id=message.request_id,
        created_ms=int(time.time() * 1000),
        temperature=message.temperature,
        seed=message.seed,
    )
    supersede = ""
    limit = gw.config.quotas.generations_per_user
    for _attempt in range(SUPERSEDE_ATTEMPTS):
        result = await gw.store.submit(job, supersede, limit)
        match result.outcome:
            case "ok" | "dup":
                mid = result.message_id
                await conn.reply(Accepted(session_id=job.session_id, message_id=mid, request_id=job.request_id))
                if result.outcome == "ok" or mid not in conn.relays:
                    conn.relay(mid, 0)
                log.info("chat_accepted", message_id=mid, session_id=job.session_id, duplicate=result.outcome == "dup")
                return
            case "busy":
                supersede = result.message_id
                status, worker = await gw.store.cancel(supersede, conn.user, "superseded")
                await tell_worker(gw.store, worker, supersede)
                log.info("chat_supersedes", message_id=supersede, session_id=job.session_id, status=status)
            case "rate_limited":
                conn.refused("generations")
                await conn.error(
                    "rate_limited",
                    f"you have {limit} generations queued or running; wait for one to end",
                    job.request_id,
                    retry_after_ms=GENERATIONS_RETRY_MS,
                )
                return
            case "overloaded":
                await conn.error("overloaded", "the job queue is full; try again later", job.request_id)
                return
    await conn.error("internal", "the session kept changing under this request; send it again", job.request_id)


async def cancel(conn: Connection, message: Cancel) -> None:
    """The client's answer first, then the log line, then the worker's push: the worker is
    woken last, so the `cancelled` that the CANCEL script published gets the CPU first
    (docs/PERFORMANCE.md, "cancel latency")."""
    started = time.perf_counter()
    gw = conn.gw
    if message.message_id is None and message.session_id is None:
        await conn.error("bad_request", "cancel needs message_id or session_id")
        return
    target = message.message_id
    if target is None and message.session_id is not None:
        target = await gw.store.active_message(conn.user, message.session_id)
        if target is None:
            target = await gw.store.last_message(conn.user, message.session_id)
    status: CancelStatus = "not_found"
    worker = ""
    with conn.cancel_result_first(target or ""):
        if target is not None:  # an id never issued to this user is not_found without a Redis key built
            status, worker = await gw.store.cancel(target, conn.user, "user")
        await conn.reply(CancelResult(status=status, message_id=target, session_id=message.session_id))
    elapsed = time.perf_counter() - started
    metrics.CANCELS.labels(status).inc()
    metrics.CANCEL_SECONDS.observe(elapsed)
    log.info(
        "cancel",
        message_id=target,
        session_id=message.session_id,
        status=status,
        gateway_id=gw.id,
        worker_id=worker or None,
        elapsed_ms=round(elapsed * 1000, 3),
    )
    if target is not None:
        await tell_worker(gw.store, worker, target)


async def tell_worker(store: Store, worker: str, message_id: str) -> None:
    """Push a cancel to the worker that runs the message ("" when none needs telling). The
    message has already ended in the store, so a lost push only means that the worker stops
    at its next chunk (refused) instead of at once: logged, not reported to the client."""
    if not worker:
        return
    try:
        await store.notify_worker(worker, message_id)
    except Unavailable as exc:
        log.warning("cancel_push_failed", message_id=message_id, worker_id=worker, error=str(exc))


async def resume(conn: Connection, message: Resume) -> None:
    store = conn.gw.store
    owner = await store.message_owner(message.message_id) if store.may_own(conn.user, message.message_id) else None
    if owner is None or owner.user != conn.user:
        await conn.error("not_found", "no such message (unknown, expired, or not yours)", message_id=message.message_id)
        return
    await conn.gw.store.refresh_attach([message.message_id], conn.gw.store.lifetimes.detach_grace_ms)
    conn.relay(message.message_id, message.after_seq)
    log.info("resume", message_id=message.message_id, after_seq=message.after_seq, gateway_id=conn.gw.id)
