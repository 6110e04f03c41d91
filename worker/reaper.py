"""Recovering jobs of dead workers, driven by liveness keys (never by a long idle timeout).

A pending entry whose consumer has no liveness key is XCLAIMed (min idle = the liveness TTL,
so two reapers never both win). Then, by the message's state:
- queued (the dead worker read it but never claimed it): run it normally;
- running, nothing streamed yet (last_seq 0): take it over and generate from scratch;
- running, chunks already streamed: end it with `error` / `worker_lost`; the text would not
  continue where it stopped, and a seam in an answer is worse than an honest error;
- ended: just acknowledge it (one the store cancelled while its worker was dead first gets
  its partial text saved in history, from the log).
An entry delivered more than `max_deliveries` times (it kills every worker that takes it) is
copied to the dead-letter stream and ended with `error` / `worker_lost`.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

import redis.exceptions
import structlog

from protocol.jobs import Job, job_decoder
from protocol.messages import Error, encode_text
from store import Unavailable, keys
from store.redis_store import CONNECTION_ERRORS
from worker import metrics
from worker.job import finish_with_retry

if TYPE_CHECKING:
    from worker.runner import Worker

log = structlog.get_logger("worker.reaper")


class Reaper:
    def __init__(self, worker: Worker, max_deliveries: int = 3) -> None:
        self.worker = worker
        self.max_deliveries = max_deliveries
        self._last_consumer_sweep = 0.0

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.worker.config.reap_interval_s)
            try:
                await self.reap_once()
            except (*CONNECTION_ERRORS, Unavailable) as exc:
                log.warning("reap_failed", error=str(exc))
            except redis.exceptions.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                log.warning("jobs_group_missing", error=str(exc))
                await self.worker.ensure_group()

    async def reap_once(self) -> int:
        redis = self.worker.store.redis
        pending: list[dict[str, Any]] = await redis.xpending_range(
            keys.JOBS_STREAM, keys.WORKER_GROUP, min="-", max="+", count=200
        )
        others = sorted({p["consumer"].decode() for p in pending} - {self.worker.id})
        if not others:
            await self._sweep_consumers()
            return 0
        async with redis.pipeline(transaction=False) as pipe:
            for consumer in others:
                pipe.exists(keys.alive(consumer))
            alive = dict(zip(others, await pipe.execute()))
        reclaimed = 0
        for entry in pending:
            consumer = entry["consumer"].decode()
            if consumer == self.worker.id or alive.get(consumer, 1):
                continue
            claimed: list[tuple[bytes, dict[bytes, bytes]]] = await redis.xclaim(  # type: ignore[assignment]
                keys.JOBS_STREAM,
                keys.WORKER_GROUP,
                self.worker.id,
                min_idle_time=self.worker.config.lifetimes.alive_ttl_ms,
                message_ids=[entry["message_id"]],
            )
            for entry_id, fields in claimed:
                if fields:
                    await self._recover(entry_id, fields, consumer, entry["times_delivered"] + 1)
                    reclaimed += 1
        return reclaimed

    async def _recover(self, entry_id: bytes, fields: dict[bytes, bytes], dead: str, deliveries: int) -> None:
        job = job_decoder.decode(fields[b"j"])
        store = self.worker.store
        bound = log.bind(message_id=job.message_id, session_id=job.session_id, dead_worker=dead)
        owner = await store.message_owner(job.message_id)
        state = owner[1] if owner else None
        if state == "queued":
            bound.info("reclaimed_queued")
            metrics.RECLAIMED.labels("requeued").inc()
            self.worker.start_job(entry_id, job)
            return
        taken = await store.takeover(job.message_id, dead, self.worker.id) if state == "running" else None
        if taken is None:
            if state == "cancelled":
                await store.save_cancelled_answer(job.message_id, await store.partial_text(job.message_id))
            await self.worker.ack(entry_id)
            return
        attempt, last_seq = taken
        if deliveries > self.max_deliveries:
            await redis_dead_letter(self.worker, fields, dead, deliveries)
            await self._fail(entry_id, job, attempt, last_seq, "the job failed on every worker that took it")
            bound.error("dead_lettered", deliveries=deliveries)
            metrics.RECLAIMED.labels("dead_letter").inc()
        elif last_seq == 0:
            bound.info("reclaimed_restart", attempt=attempt)
            metrics.RECLAIMED.labels("restarted").inc()
            self.worker.start_job(entry_id, job, attempt=attempt)
        else:
            await self._fail(entry_id, job, attempt, last_seq, "the worker generating this answer died")
            bound.warning("reclaimed_worker_lost", last_seq=last_seq)
            metrics.RECLAIMED.labels("worker_lost").inc()

    async def _fail(self, entry_id: bytes, job: Job, attempt: int, seq: int, why: str) -> None:
        message_id = job.message_id
        frame = encode_text(Error(code="worker_lost", message=why, message_id=message_id, seq=seq))
        text = await self.worker.store.partial_text(message_id)
        await finish_with_retry(
            self.worker.store, self.worker.id, message_id, attempt, "error", seq, frame, text, user=job.user
        )
        await self.worker.ack(entry_id)

    async def _sweep_consumers(self) -> None:
        """Forget consumers that are dead and own nothing (the group stays bounded)."""
        now = time.monotonic()
        if now - self._last_consumer_sweep < 30:
            return
        self._last_consumer_sweep = now
        client = self.worker.store.redis
        try:
            consumers: list[dict[str, Any]] = await client.xinfo_consumers(
                keys.JOBS_STREAM, keys.WORKER_GROUP
            )
        except redis.exceptions.ResponseError as exc:
            log.warning("consumer_sweep_failed", error=str(exc))
            return
        for consumer in consumers:
            name = consumer["name"].decode() if isinstance(consumer["name"], bytes) else consumer["name"]
            if name == self.worker.id or consumer["pending"]:
                continue
            if not await client.exists(keys.alive(name)):
                await client.xgroup_delconsumer(keys.JOBS_STREAM, keys.WORKER_GROUP, name)


async def redis_dead_letter(worker: Worker, fields: dict[bytes, bytes], dead: str, deliveries: int) -> None:
    await worker.store.redis.xadd(
        keys.DEAD_STREAM,
        {b"j": fields[b"j"], b"last_worker": dead, b"deliveries": deliveries},
        maxlen=worker.config.lifetimes.dead_maxlen,
        approximate=True,
    )

