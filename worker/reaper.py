"""Recovering jobs nobody runs any more, driven by liveness keys (never by a long idle timeout).

Every pending entry of a consumer without a liveness key (a dead worker) is XCLAIMed (min
idle = the liveness TTL, so two reapers never both win), page by page. This worker's own
pending entries that no task of it handles (a job forgotten after an unexpected failure) are
recovered the same way, without a claim. Then, by the message's state:
- queued (read but never claimed): run it normally;
- running, nothing streamed yet (last_seq 0): take it over and generate from scratch;
- running, chunks already streamed: end it with `error` / `worker_lost`; the text would not
  continue where it stopped, and a seam in an answer is worse than an honest error;
- ended or gone: just acknowledge it (one the store cancelled while its worker was dead first
  gets its partial text saved in history, from the log).
An entry delivered more than `max_deliveries` times (it kills every worker that takes it) is
copied to the dead-letter stream and ended with `error` / `worker_lost`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import redis.exceptions
import structlog

from protocol.jobs import Job
from protocol.messages import Error
from store import keys
from store.retry import REDIS_ERRORS, retry
from worker import metrics
from worker.job import Taken

if TYPE_CHECKING:
    from worker.runner import Worker

log = structlog.get_logger("worker.reaper")

PAGE = 100


class Reaper:
    def __init__(self, worker: Worker, max_deliveries: int = 3) -> None:
        self.worker = worker
        self.max_deliveries = max_deliveries
        self._sweeps = 0

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.worker.config.reap_interval_s)
            try:
                await self.reap_once()
            except REDIS_ERRORS as exc:
                log.warning("reap_failed", error=str(exc))

    async def reap_once(self) -> int:
        """Recover what dead consumers and this worker's forgotten jobs hold, in every job
        stream; how many."""
        recovered = 0
        for stream in self.worker.store.keyspace.job_streams():
            try:
                recovered += await self._reap_stream(stream)
            except REDIS_ERRORS as exc:
                if "NOGROUP" not in str(exc):
                    raise
                log.warning("jobs_group_missing", stream=stream, error=str(exc))
                await self.worker.ensure_group(stream)
        self._sweeps += 1
        if self._sweeps % 30 == 0:
            for stream in self.worker.store.keyspace.job_streams():
                await self._forget_dead_consumers(stream)
        return recovered

    async def _reap_stream(self, stream: str) -> int:
        summary: dict[str, Any] = await self.worker.store.redis.xpending(stream, keys.WORKER_GROUP)
        consumers = [_s(c["name"]) for c in summary.get("consumers") or []]
        others = [c for c in consumers if c != self.worker.id]
        alive = await self.worker.store.exists_many([keys.alive(c) for c in others])
        recovered = 0
        for consumer, is_alive in zip(others, alive):
            if not is_alive:
                recovered += await self._take_over_consumer(stream, consumer)
        if self.worker.id in consumers:
            recovered += await self._recover_forgotten(stream)
        return recovered

    async def _take_over_consumer(self, stream: str, dead: str) -> int:
        recovered = 0
        async for entry in self._pending(stream, dead):
            claimed: list[tuple[bytes, dict[bytes, bytes]]] = await self.worker.store.redis.xclaim(  # type: ignore[assignment]
                stream,
                keys.WORKER_GROUP,
                self.worker.id,
                min_idle_time=self.worker.config.lifetimes.alive_ttl_ms,
                message_ids=[entry["message_id"]],
            )
            for entry_id, fields in claimed:
                if fields:
                    await self._recover(entry_id, fields[b"m"].decode(), dead, entry["times_delivered"] + 1)
                    recovered += 1
        return recovered

    async def _recover_forgotten(self, stream: str) -> int:
        """This worker's pending entries that none of its tasks handles."""
        recovered = 0
        async for entry in self._pending(stream, self.worker.id):
            entry_id: bytes = entry["message_id"]
            if entry_id in self.worker.handling or entry["time_since_delivered"] < 1000:
                continue
            found: list[tuple[bytes, dict[bytes, bytes]]] = await self.worker.store.redis.xrange(  # type: ignore[assignment]
                stream, entry_id, entry_id
            )
            if not found:  # trimmed away: nothing left to run
                await retry(lambda: self.worker.store.ack_in(stream, entry_id), "xack")
                continue
            log.warning("forgotten_job", entry=entry_id.decode())
            await self._recover(entry_id, found[0][1][b"m"].decode(), self.worker.id, entry["times_delivered"])
            recovered += 1
        return recovered

    async def _pending(self, stream: str, consumer: str) -> AsyncIterator[dict[str, Any]]:
        """Every pending entry of `consumer` in `stream`, a page at a time (oldest first)."""
        start = "-"
        while True:
            page: list[dict[str, Any]] = await self.worker.store.redis.xpending_range(
                stream, keys.WORKER_GROUP, min=start, max="+", count=PAGE, consumername=consumer
            )
            for entry in page:
                yield entry
            if len(page) < PAGE:
                return
            start = "(" + _s(page[-1]["message_id"])

    async def _recover(self, entry_id: bytes, message_id: str, dead: str, deliveries: int) -> None:
        worker, store = self.worker, self.worker.store
        bound = log.bind(message_id=message_id, dead_worker=dead)
        owner = await store.message_owner(message_id)
        state = owner.state if owner else None
        if state == "queued":
            bound.info("reclaimed_queued")
            metrics.RECLAIMED.labels("requeued").inc()
            worker.start_job(entry_id, message_id)
            return
        taken = await store.takeover(message_id, dead, worker.id) if state == "running" else None
        if taken is None:
            if owner is not None and state == "cancelled":
                text = await worker.partial_text(message_id)
                await store.save_cancelled_answer(message_id, text, owner.user, owner.session_id)
            if state in ("done", "cancelled", "error"):
                await store.publish_end(message_id)  # an end whose worker died before publishing it
            await worker.ack(message_id, entry_id)
            return
        attempt, last_seq, job = taken
        if deliveries > self.max_deliveries:
            await self._dead_letter(entry_id, message_id, dead, deliveries)
            await self._fail(entry_id, job, attempt, "the job failed on every worker that took it")
            bound.error("dead_lettered", deliveries=deliveries)
            metrics.RECLAIMED.labels("dead_letter").inc()
        elif last_seq == 0:
            bound.info("reclaimed_restart", attempt=attempt)
            metrics.RECLAIMED.labels("restarted").inc()
            worker.start_job(entry_id, message_id, Taken(attempt, job))
        else:
            await self._fail(entry_id, job, attempt, "the worker generating this answer died")
            bound.warning("reclaimed_worker_lost", last_seq=last_seq)
            metrics.RECLAIMED.labels("worker_lost").inc()

    async def _fail(self, entry_id: bytes, job: Job, attempt: int, why: str) -> None:
        error = Error(code="worker_lost", message=why, message_id=job.message_id, seq=0)
        await self.worker.end(attempt, error, job)
        await self.worker.ack(job.message_id, entry_id)

    async def _dead_letter(self, entry_id: bytes, message_id: str, dead: str, deliveries: int) -> None:
        await self.worker.store.redis.xadd(
            keys.DEAD_STREAM,
            {b"m": message_id, b"entry": entry_id, b"last_worker": dead, b"deliveries": deliveries},
            maxlen=self.worker.config.lifetimes.dead_maxlen,
            approximate=True,
        )

    async def _forget_dead_consumers(self, stream: str) -> None:
        """Forget consumers that are dead and own nothing (the group stays bounded)."""
        client = self.worker.store.redis
        try:
            consumers: list[dict[str, Any]] = await client.xinfo_consumers(stream, keys.WORKER_GROUP)
        except redis.exceptions.ResponseError as exc:
            log.warning("consumer_sweep_failed", error=str(exc))
            return
        idle = [_s(c["name"]) for c in consumers if not c["pending"] and _s(c["name"]) != self.worker.id]
        alive = await self.worker.store.exists_many([keys.alive(name) for name in idle])
        for name, is_alive in zip(idle, alive):
            if not is_alive:
                await client.xgroup_delconsumer(stream, keys.WORKER_GROUP, name)


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
