"""A worker process: consumes the jobs stream, runs jobs, listens for pushed cancels.

Background tasks, all supervised (a failure is logged and the task restarts) and stopped on
shutdown:
- consume: XREADGROUP as many jobs as there are free engine slots;
- cancels: SUBSCRIBE to the cancel channel (a lean hiredis subscriber); on (re)subscribe,
  re-check cancel keys of the running jobs (pub/sub is at-most-once, the keys are the durable
  truth);
- beat: liveness key and instance record (`store.registry`);
- orphans: cancel running jobs whose attach lease expired (no client for the detach grace);
- reaper: take over pending jobs of dead workers, and end jobs this worker holds but no
  longer runs (see `worker.reaper`);
- chunk-writer: the batched chunk writes (`worker.writer`).
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
from protocol.jobs import Job
from protocol.messages import Error, Terminal
from store import Unavailable, keys
from store.redis_store import Store
from store.topology import AnyRedis, Topology, ready, single
from store.registry import Registry
from store.retry import REDIS_ERRORS, Backoff, retry
from store.settings import Lifetimes
from store.tasks import Supervisor
from worker import metrics
from worker.consume import Consumer
from worker.engines.base import Engine
from worker.job import JobServices, Running, Taken, end, run_job
from worker.progress import SHUTDOWN
from worker.reaper import Reaper
from worker.writer import WRITE_PACE_S, ChunkWriter

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
    redis_deadline_s: float = 30.0
    """How long a job's writes may be refused before it ends `error` / `unavailable`."""
    write_pace_s: float = WRITE_PACE_S
    """Under load, at most one batch of chunk writes per this long (`ChunkWriter`)."""
    poll_every_chunks: int = 0
    """0: cancels are pushed (pub/sub). N > 0: benchmark baseline, poll the cancel key every N chunks."""
    lifetimes: Lifetimes = field(default_factory=Lifetimes)
    topology: Topology | None = None
    """Where the data lives (`store.topology.discover`); None: one Redis at `redis_url`, one shard."""


class Worker:
    def __init__(self, config: WorkerConfig, engines: list[Engine]) -> None:
        self.config = config
        self.id = config.worker_id
        self.topology = config.topology or single(config.redis_url)
        self.store = Store.open(self.topology, config.lifetimes)
        self._blocking: AnyRedis = self.topology.client(timeout_s=config.block_ms / 1000 + 5)
        self._engines: asyncio.Queue[Engine] = asyncio.Queue()
        self._all_engines = engines
        self.writer = ChunkWriter(self.store, self.id, deadline_s=config.redis_deadline_s, pace_s=config.write_pace_s)
        self.running: dict[str, Running] = {}
        self.handling: set[bytes] = set()
        """Job stream entries this worker has a task for (claiming, running or ending)."""
        self._job_tasks: set[asyncio.Task[None]] = set()
        self.consumer = Consumer(
            self._blocking, self.store.keyspace.job_streams(), keys.WORKER_GROUP, self.id,
            free_slots=self._free_slots, on_entries=self._on_entries, ensure_group=self.ensure_group,
            block_ms=config.block_ms,
        )
        self.with_history = any(e.name == "llama" for e in engines)
        self.registry = Registry(
            self.store, "worker", self.id, self._describe,
            period_s=config.lifetimes.alive_ttl_ms / 3000, alive_ttl_ms=config.lifetimes.alive_ttl_ms,
        )

    def _describe(self) -> dict[str, str | int | float]:
        return {"active": len(self.running), "capacity": len(self._all_engines), "model": self._all_engines[0].model}

    async def ensure_group(self, stream: str) -> None:
        try:
            await self.store.redis.xgroup_create(stream, keys.WORKER_GROUP, id="0", mkstream=True)
        except redis.exceptions.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def run(self, stop: asyncio.Event) -> None:
        structlog.contextvars.bind_contextvars(worker_id=self.id)
        for engine in self._all_engines:
            await engine.start()
            self._engines.put_nowait(engine)
        await self.store.start()
        await ready(self._blocking)
        for stream in self.store.keyspace.job_streams():
            await retry(lambda: self.ensure_group(stream), "xgroup_create")
        await retry(self.store.load_append_script, "script_load")
        self.writer.start()
        background = Supervisor()
        background.start(self.registry.run, "beat")
        if not self.config.poll_every_chunks:
            background.start(self._listen_cancels, "cancels")
        background.start(self._watch_orphans, "orphans")
        background.start(Reaper(self).run, "reaper")
        consume = Supervisor()
        consume.start(self.consumer.run, "consume")
        log.info("worker_started", concurrency=self.config.concurrency, engine=self._all_engines[0].name)
        await stop.wait()
        log.info("worker_draining", running=len(self.running))
        await consume.close()
        await self._drain()
        await background.close()
        await self.writer.close()
        await self.registry.remove()
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

    def _free_slots(self) -> int:
        return self._engines.qsize() - self._claimed_waiting()

    def _on_entries(self, _stream: str, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        for entry_id, fields in entries:
            self.start_job(entry_id, fields[b"m"].decode())

    def _claimed_waiting(self) -> int:
        return len(self._job_tasks) - len(self.running)

    def start_job(self, entry_id: bytes, message_id: str, taken: Taken | None = None) -> None:
        """Run the job of a stream entry: claim it first unless it was already `taken`."""
        self.handling.add(entry_id)
        task = asyncio.create_task(self._handle(entry_id, message_id, taken), name=f"job-{message_id}")
        self._job_tasks.add(task)
        task.add_done_callback(self._job_done)

    def _job_done(self, task: asyncio.Task[None]) -> None:
        self._job_tasks.discard(task)
        self.consumer.slot_freed.set()

    async def _handle(self, entry_id: bytes, message_id: str, taken: Taken | None) -> None:
        bound = log.bind(message_id=message_id)
        try:
            if taken is None:
                now_ms = int(time.time() * 1000)
                claimed = await retry(lambda: self.store.claim(message_id, self.id, now_ms), "claim")
                if claimed is None:
                    await self.ack(message_id, entry_id)
                    return
                taken = Taken(*claimed)
            outcome = await self._run(taken)
            if outcome != "lost":
                await self.ack(message_id, entry_id)
        except Exception as exc:  # a job this worker owns must still end: say so in its terminal
            bound.exception("job_failed")
            if taken is not None:
                why = f"the worker failed: {type(exc).__name__}"
                error = Error(code="internal", message=why, message_id=message_id, seq=0)
                await self.end(taken.attempt, error, taken.job)
                await self.ack(message_id, entry_id)
        finally:
            self.handling.discard(entry_id)

    async def _run(self, taken: Taken) -> str:
        engine = await self._engines.get()
        running = Running(taken.job, taken.attempt)
        self.running[taken.job.message_id] = running
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
                self.config.redis_deadline_s,
            )
            outcome = await run_job(services, running, taken.start_seq)
        finally:
            metrics.RUNNING.dec()
            del self.running[taken.job.message_id]
            self._engines.put_nowait(engine)
        metrics.JOBS.labels(outcome).inc()
        return outcome

    async def end(self, attempt: int, terminal: Terminal, job: Job) -> None:
        """End a message this worker owns but does not generate, its log's text as the answer."""
        text = await self.partial_text(job.message_id)
        await end(self.store, self.id, attempt, job, terminal, text, self.config.redis_deadline_s)

    async def partial_text(self, message_id: str) -> str:
        return await retry(lambda: self.store.partial_text(message_id), "partial_text")

    async def ack(self, message_id: str, entry_id: bytes) -> None:
        await retry(lambda: self.store.ack(message_id, entry_id), "xack")

    # --- cancellation -------------------------------------------------------------------

    def signal_cancel(self, message_id: str, source: str) -> None:
        """Stop a running job at once. Its log line is the job's `job_finished` (with the
        source and the phase the cancel hit), written once the job has ended, so the
        client's `cancelled` is relayed first (docs/PERFORMANCE.md, "cancel latency")."""
        running = self.running.get(message_id)
        if running is not None and running.token.cancel("cancel"):
            running.cancel_source = source
            metrics.CANCEL_SIGNALS.labels(source).inc()

    async def _listen_cancels(self) -> None:
        """Keep one lean subscriber on this worker's cancel channel (`store.subscriber`: a
        push is one hiredis parse and a call, no reader task), reconnecting with backoff."""
        backoff = Backoff()
        while True:
            error, listened = await self._cancel_subscription()
            if listened:
                backoff.reset()
            delay = await backoff.wait()
            log.warning("cancel_listener_retry", error=str(error), backoff_s=round(delay, 3))

    async def _cancel_subscription(self) -> tuple[BaseException | None, bool]:
        """One connection: subscribe, read the cancel keys once (pub/sub drops what is
        published while nobody listens), then take pushes until it ends. Returns why it
        ended, and whether it got as far as listening."""
        try:
            subscriber = await self.topology.subscriber(self._on_cancel_push)
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
        except REDIS_ERRORS as exc:
            return exc, False
        finally:
            subscriber.close()

    def _on_cancel_push(self, _channel: bytes, data: bytes) -> None:
        self.signal_cancel(data.decode(), "push")

    async def _catch_up_cancels(self) -> None:
        """Cancels published while we were not subscribed: read the durable keys once."""
        mids = list(self.running)
        found = await self.store.exists_many([keys.cancel_key(mid) for mid in mids])
        for mid, cancelled in zip(mids, found):
            if cancelled:
                self.signal_cancel(mid, "catch_up")

    async def _watch_orphans(self) -> None:
        """Cancel generations that no connection has watched for the detach grace period."""
        while True:
            await asyncio.sleep(self.config.orphan_check_s)
            mids = [m for m, r in self.running.items() if not r.token.cancelled]
            try:
                attached = await self.store.exists_many([keys.attach_lease(mid) for mid in mids])
            except Unavailable as exc:
                log.warning("orphan_check_failed", error=str(exc))
                continue
            for mid, watched in zip(mids, attached):
                running = self.running.get(mid)
                if not watched and running is not None and running.token.cancel("orphaned"):
                    metrics.CANCEL_SIGNALS.labels("orphaned").inc()
                    log.info("orphan_cancelled", message_id=mid)
