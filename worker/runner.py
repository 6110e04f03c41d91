"""A worker process: consumes the jobs stream, runs jobs, listens for pushed cancels.

Background tasks, all owned by `Worker.run` and cancelled on shutdown:
- consume: XREADGROUP as many jobs as there are free engine slots;
- cancels: SUBSCRIBE to the cancel channel (a lean hiredis subscriber); on (re)subscribe,
  re-check cancel keys of the running jobs (pub/sub is at-most-once, the keys are the durable
  truth);
- beat: liveness key and instance record (monitoring, reaping);
- orphans: cancel running jobs whose attach lease expired (no client for the detach grace);
- reaper: take over pending jobs of workers whose liveness key expired (see `worker.reaper`).
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from dataclasses import dataclass, field

import redis.exceptions
import structlog

from protocol import coalesce
from protocol.jobs import Job, job_decoder
from store import Unavailable, keys
from store.redis_store import CONNECTION_ERRORS, Redis, Store, connect, retry
from store.settings import Lifetimes
from store.subscriber import Subscriber
from store.tasks import cancel_all, spawn
from worker import metrics
from worker.engines.base import Engine
from worker.job import SHUTDOWN, JobServices, Running, run_job
from worker.reaper import Reaper
from worker.writer import ChunkWriter

log = structlog.get_logger("worker")


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    redis_url: str
    concurrency: int
    worker_id: str = field(default_factory=lambda: f"w-{socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}")
    block_ms: int = 1_000
    orphan_check_s: float = 1.0
    reap_interval_s: float = 1.0
    drain_timeout_s: float = 20.0
    subscribe_timeout_s: float = 5.0
    coalesce_window_s: float = coalesce.WINDOW_S
    poll_every_chunks: int = 0
    """0: cancels are pushed (pub/sub). N > 0: benchmark baseline, poll the cancel key every N chunks."""
    lifetimes: Lifetimes = field(default_factory=Lifetimes)


class Worker:
    def __init__(self, config: WorkerConfig, engines: list[Engine]) -> None:
        self.config = config
        self.id = config.worker_id
        self.store = Store(connect(config.redis_url), config.lifetimes)
        self._blocking: Redis = connect(config.redis_url, timeout_s=config.block_ms / 1000 + 5)
        self._engines: asyncio.Queue[Engine] = asyncio.Queue()
        self._all_engines = engines
        self.writer = ChunkWriter(self.store, self.id)
        self.running: dict[str, Running] = {}
        self._job_tasks: set[asyncio.Task[None]] = set()
        self._slot_freed = asyncio.Event()
        self.started = time.time()
        self.with_history = any(e.name == "llama" for e in engines)

    async def ensure_group(self) -> None:
        try:
            await self.store.redis.xgroup_create(keys.JOBS_STREAM, keys.WORKER_GROUP, id="0", mkstream=True)
        except redis.exceptions.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def run(self, stop: asyncio.Event) -> None:
        structlog.contextvars.bind_contextvars(worker_id=self.id)
        for engine in self._all_engines:
            await engine.start()
            self._engines.put_nowait(engine)
        await retry(self.ensure_group, "xgroup_create")
        await retry(self.store.load_append_script, "script_load")
        self.writer.start()
        reaper = Reaper(self)
        background = [
            spawn(self._beat(), "beat", stop),
            *([] if self.config.poll_every_chunks else [spawn(self._listen_cancels(), "cancels", stop)]),
            spawn(self._watch_orphans(), "orphans", stop),
            spawn(reaper.run(), "reaper", stop),
        ]
        consume = spawn(self._consume(), "consume", stop)
        log.info("worker_started", concurrency=self.config.concurrency, engine=self._all_engines[0].name)
        await stop.wait()
        log.info("worker_draining", running=len(self.running))
        await cancel_all([consume])
        await self._drain()
        await cancel_all(background)
        await self.writer.close()
        try:
            await self.store.redis.delete(keys.alive(self.id), keys.instance("worker", self.id))
        except CONNECTION_ERRORS as exc:
            log.warning("deregister_failed", error=str(exc), note="the keys expire by their TTL")
        for engine in self._all_engines:
            await engine.close()
        await self.store.close()
        await self._blocking.aclose()
        log.info("worker_stopped")

    async def _drain(self) -> None:
        """Running jobs get `drain_timeout_s` to finish while the worker still beats (so
        nobody reclaims them); the rest end with `error` / `worker_lost`, partial text kept."""
        if not self._job_tasks:
            return
        _done, pending = await asyncio.wait(self._job_tasks, timeout=self.config.drain_timeout_s)
        if pending:
            for running in self.running.values():
                running.token.cancel(SHUTDOWN)
            await asyncio.wait(pending, timeout=5.0)

    # --- consuming ----------------------------------------------------------------------

    async def _consume(self) -> None:
        backoff = 0.05
        while True:
            free = self._engines.qsize() - self._claimed_waiting()
            if free <= 0:
                self._slot_freed.clear()
                await self._slot_freed.wait()
                continue
            try:
                reply = await self._blocking.xreadgroup(
                    keys.WORKER_GROUP, self.id, {keys.JOBS_STREAM: ">"}, count=free, block=self.config.block_ms
                )
                backoff = 0.05
            except redis.exceptions.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                await retry(self.ensure_group, "xgroup_create")
                continue
            except CONNECTION_ERRORS as exc:
                log.warning("consume_retry", error=str(exc), backoff_s=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            streams: list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]] = reply or []  # type: ignore[assignment]
            for _stream, entries in streams:
                for entry_id, fields in entries:
                    self.start_job(entry_id, job_decoder.decode(fields[b"j"]))

    def _claimed_waiting(self) -> int:
        return len(self._job_tasks) - len(self.running)

    def start_job(self, entry_id: bytes, job: Job, attempt: int | None = None, start_seq: int = 0) -> None:
        task = asyncio.create_task(self._handle(entry_id, job, attempt, start_seq), name=f"job-{job.message_id}")
        self._job_tasks.add(task)
        task.add_done_callback(self._job_done)

    def _job_done(self, task: asyncio.Task[None]) -> None:
        self._job_tasks.discard(task)
        self._slot_freed.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("job_task_failed", error=repr(task.exception()))

    async def _handle(self, entry_id: bytes, job: Job, attempt: int | None, start_seq: int) -> None:
        if attempt is None:
            now_ms = int(time.time() * 1000)
            attempt = await retry(lambda: self.store.claim(job.message_id, self.id, now_ms), "claim")
        if attempt is None:
            await self.ack(entry_id)
            return
        engine = await self._engines.get()
        running = Running(job, attempt)
        self.running[job.message_id] = running
        metrics.RUNNING.inc()
        try:
            services = JobServices(
                self.store,
                self.writer,
                engine,
                self.id,
                self.config.coalesce_window_s,
                self.with_history,
                self.config.poll_every_chunks,
            )
            outcome = await run_job(services, running, start_seq)
        finally:
            metrics.RUNNING.dec()
            del self.running[job.message_id]
            self._engines.put_nowait(engine)
        metrics.JOBS.labels(outcome).inc()
        if outcome != "lost":
            await self.ack(entry_id)

    async def ack(self, entry_id: bytes) -> None:
        await retry(lambda: self.store.ack(entry_id), "xack")

    # --- cancellation -------------------------------------------------------------------

    def signal_cancel(self, message_id: str, source: str) -> None:
        """Stop a running job at once. Its log line is the job's `job_finished` (with the
        source and the phase the cancel hit), written once the job has ended: a line written
        here, as the client's `cancelled` is being relayed, costs that relay a CPU on a small
        machine (idle p95 1.51-1.53 ms without it, 1.68-1.75 ms with it, measured)."""
        running = self.running.get(message_id)
        if running is not None and running.token.cancel("cancel"):
            running.cancel_source = source
            metrics.CANCEL_SIGNALS.labels(source).inc()

    async def _listen_cancels(self) -> None:
        """Keep one lean subscriber on this worker's cancel channel (`store.subscriber`: a
        push is one hiredis parse and a call, no reader task), reconnecting with backoff."""
        backoff = 0.05
        while True:
            error, listened = await self._cancel_subscription()
            if listened:
                backoff = 0.05
            log.warning("cancel_listener_retry", error=str(error), backoff_s=backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 1.0)

    async def _cancel_subscription(self) -> tuple[BaseException | None, bool]:
        """One connection: subscribe, read the cancel keys once (pub/sub drops what is
        published while nobody listens), then take pushes until it ends. Returns why it
        ended, and whether it got as far as listening."""
        try:
            subscriber = await Subscriber.open(self.config.redis_url, self._on_cancel_push)
        except Unavailable as exc:
            return exc, False
        try:
            confirmed = subscriber.subscribe(keys.cancel_channel(self.id))
            await asyncio.wait([confirmed], timeout=self.config.subscribe_timeout_s)
            if not (confirmed.done() and confirmed.result()):
                if subscriber.closed.done():
                    return subscriber.closed.result(), False
                return TimeoutError("the subscription was not confirmed"), False
            await self._catch_up_cancels()
            return await subscriber.closed, True
        except CONNECTION_ERRORS as exc:
            return exc, False
        finally:
            subscriber.close()

    def _on_cancel_push(self, _channel: bytes, data: bytes) -> None:
        self.signal_cancel(data.decode(), "push")

    async def _catch_up_cancels(self) -> None:
        """Cancels published while we were not subscribed: read the durable keys once."""
        mids = list(self.running)
        if not mids:
            return
        async with self.store.redis.pipeline(transaction=False) as pipe:
            for mid in mids:
                pipe.exists(keys.cancel_key(mid))
            results = await pipe.execute()
        for mid, found in zip(mids, results):
            if found:
                self.signal_cancel(mid, "catch_up")

    async def _watch_orphans(self) -> None:
        """Cancel generations that no connection has watched for the detach grace period."""
        while True:
            await asyncio.sleep(self.config.orphan_check_s)
            mids = [m for m, r in self.running.items() if not r.token.cancelled]
            if not mids:
                continue
            try:
                async with self.store.redis.pipeline(transaction=False) as pipe:
                    for mid in mids:
                        pipe.exists(keys.attach_lease(mid))
                    results = await pipe.execute()
            except CONNECTION_ERRORS as exc:
                log.warning("orphan_check_failed", error=str(exc))
                continue
            for mid, attached in zip(mids, results):
                running = self.running.get(mid)
                if not attached and running is not None and running.token.cancel("orphaned"):
                    metrics.CANCEL_SIGNALS.labels("orphaned").inc()
                    log.info("orphan_cancelled", message_id=mid)

    # --- liveness -----------------------------------------------------------------------

    async def _beat(self) -> None:
        ttl_ms = self.config.lifetimes.alive_ttl_ms
        while True:
            try:
                async with self.store.redis.pipeline(transaction=False) as pipe:
                    pipe.set(keys.alive(self.id), b"1", px=ttl_ms)
                    pipe.hset(
                        keys.instance("worker", self.id),
                        mapping={
                            "kind": "worker",
                            "id": self.id,
                            "host": socket.gethostname(),
                            "pid": os.getpid(),
                            "started": self.started,
                            "active": len(self.running),
                            "capacity": len(self._all_engines),
                            "model": self._all_engines[0].model,
                            "last_beat": time.time(),
                        },
                    )
                    pipe.expire(keys.instance("worker", self.id), self.config.lifetimes.instance_ttl_s)
                    await pipe.execute()
            except CONNECTION_ERRORS as exc:
                log.warning("beat_failed", error=str(exc))
            await asyncio.sleep(ttl_ms / 3000)
