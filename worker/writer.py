"""Batches chunk writes of all jobs of a worker into pipelines (on the store's lean connection).

While one batch is in flight, new chunks wait; when it returns, they all leave in the
next one. At low load each chunk leaves at once; at high load one round trip carries many
chunks. Order per message is kept (FIFO, one pipeline at a time).

The queue is bounded: past `max_pending` chunks, `full` is true and jobs wait in `room()`
before they take the next token, so an engine never runs ahead of what Redis can take (the
queue would otherwise grow without limit, and every chunk, a new message's first one too,
would wait behind it).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import redis.exceptions
import structlog

from store import Unavailable
from store.lean import raised
from store.redis_store import APPEND_RESULTS, CONNECTION_ERRORS, Append, Store
from store.tasks import cancel_all, spawn

log = structlog.get_logger("worker.writer")


Written = Callable[[int, Append | BaseException], None]
"""Called once with a chunk's seq and what became of its write: an `Append` result, or the
error that kept it from Redis. A callback, not a future per chunk: at thousands of chunks a
second the future, its callback handle and the extra loop step cost the worker about 5% of its
CPU per token."""


@dataclass(slots=True)
class _Append:
    message_id: str
    attempt: int
    seq: int
    frame: str
    written: Written

    def report(self, result: Append | BaseException) -> None:
        """Each item is reported once: from its batch's reply, or at `close` if still queued."""
        try:
            self.written(self.seq, result)
        except Exception:
            log.exception("chunk_callback_failed", message_id=self.message_id, seq=self.seq)


class ChunkWriter:
    def __init__(self, store: Store, worker_id: str, max_batch: int = 512, max_pending: int = 1024) -> None:
        self._store = store
        self._worker_id = worker_id
        self._max_batch = max_batch
        self._max_pending = max_pending
        self._queue: list[_Append] = []
        self._wake = asyncio.Event()
        self._waiting: deque[asyncio.Future[None]] = deque()
        """Jobs waiting in `room()`, first come first served."""
        self._closed = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = spawn(self._run(), "chunk-writer")

    async def close(self) -> None:
        if self._task is not None:
            await cancel_all([self._task])
        self._closed = True
        self._release(len(self._waiting))
        for item in self._queue:
            item.report(Unavailable("worker shutting down"))

    @property
    def full(self) -> bool:
        return len(self._queue) >= self._max_pending

    async def room(self) -> None:
        """Wait until the queue is below its bound."""
        while self.full and not self._closed:
            waiter = asyncio.get_running_loop().create_future()
            self._waiting.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._release(1)  # woken, then cancelled: the place goes to the next job
                raise

    def _release(self, count: int) -> None:
        """Wake the `count` longest waiting jobs: as many as there are free places, so a
        batch leaving does not wake every job of the worker to find the queue full again."""
        while count > 0 and self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)
                count -= 1

    def append(self, message_id: str, attempt: int, seq: int, frame: str, written: Written) -> None:
        """Queue a fenced chunk write; `written` learns whether it was written, or refused
        because the message was cancelled or is no longer this worker's."""
        self._queue.append(_Append(message_id, attempt, seq, frame, written))
        self._wake.set()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                batch, self._queue = self._queue[: self._max_batch], self._queue[self._max_batch :]
                self._release(self._max_pending - len(self._queue))
                await self._write(batch)
            self._release(len(self._waiting))  # all written: a job woken that wrote nothing left its place unused

    async def _write(self, batch: list[_Append]) -> None:
        """Write a batch in order. While Redis is unreachable, retry with backoff; entries
        refused with NOSCRIPT (Redis restarted) are retried once the script is loaded again."""
        backoff = 0.05
        while batch:
            commands = [
                self._store.append_command(item.message_id, self._worker_id, item.attempt, item.seq, item.frame)
                for item in batch
            ]
            try:
                results = await self._store.lean.execute(commands)
            except CONNECTION_ERRORS as exc:
                log.warning("chunk_write_retry", error=str(exc), chunks=len(batch), backoff_s=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            retry: list[_Append] = []
            for item, result in zip(batch, results):
                try:
                    written = APPEND_RESULTS[int(raised(result))]
                except redis.exceptions.NoScriptError:
                    retry.append(item)
                    continue
                except redis.exceptions.ResponseError as exc:
                    item.report(exc)
                    continue
                item.report(written)
            if retry:
                try:
                    await self._store.load_append_script()
                except Unavailable as exc:
                    log.warning("script_load_retry", error=str(exc), backoff_s=backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 1.0)
            batch = retry
