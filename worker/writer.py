"""Batches chunk writes of all jobs of a worker into pipelines (on the store's lean connection).

While one batch is in flight, new chunks wait; when it returns, they all leave in the next
one. At low load each chunk leaves at once; at high load one round trip carries many chunks.
With `pace_s`, batches also leave at most one per `pace_s` unless a full batch is waiting
(the first after a quiet `pace_s` leaves at once, as in `protocol.coalesce`): under load each
round trip carries more chunks, for fewer writes, reads and wake-ups per token in the worker,
Redis and the gateways, at the price of up to `pace_s` more delay per chunk.

Order per message is kept, through failures too: a write that Redis refuses for any reason
other than fencing (OOM, READONLY, LOADING, a dropped connection...) goes back to the front
of the queue with the chunks of its message that followed it, and the queue is retried with
backoff. APPEND stores only the next seq of a message, so a chunk that overtook a refused one
is refused as out of order and resent after it. When the store is behind chunks it had
accepted (a Redis Cluster failover loses what the old master had not replicated yet), the
job's own copy of those chunks (`Earlier`) is written again before the refused one, so the log
holds what clients already saw, at the same seqs. A chunk refused for `deadline_s` in a row is
reported failed (`DeadlinePassed`), and so is every later chunk of its message.

The queue is bounded: past `max_pending` chunks, `full` is true and jobs wait in `room()`
before they take the next token, so an engine never runs ahead of what Redis can take.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import redis.exceptions
import structlog

from store import Unavailable
from store.redis_store import Append, Store, append_outcome
from store import DeadlinePassed
from store.retry import REDIS_ERRORS, Backoff
from store.tasks import Supervisor

log = structlog.get_logger("worker.writer")

WRITE_PACE_S = 0.004
"""The worker's default `pace_s` (docs/PERFORMANCE.md, "Write pacing")."""


Written = Callable[[int, Append | BaseException], None]
"""Called once with a chunk's seq and what became of its write: an `Append` result (never
"out_of_order": those are resent), or the error that kept it from Redis. A callback, not a
future per chunk: chunks are many (docs/PERFORMANCE.md, "relay overhead")."""

Earlier = Callable[[int], str | None]
"""The frame of an earlier seq of the same message, or None if the job no longer has it."""


def _rewritten(seq: int, outcome: Append | BaseException) -> None:
    """What became of a chunk written again (its job counted it written long ago)."""
    if not isinstance(outcome, str):
        log.warning("chunk_rewrite_failed", seq=seq, error=str(outcome))


@dataclass(slots=True)
class _Append:
    message_id: str
    attempt: int
    seq: int
    frame: str
    written: Written
    earlier: Earlier | None = None
    refused_since: float | None = None
    """When Redis first refused this write (monotonic); None while it has not."""

    def report(self, result: Append | BaseException) -> None:
        """Each item is reported once: from its batch's reply, or at `close` if still queued."""
        try:
            self.written(self.seq, result)
        except Exception:
            log.exception("chunk_callback_failed", message_id=self.message_id, seq=self.seq)


class ChunkWriter:
    def __init__(
        self,
        store: Store,
        worker_id: str,
        *,
        deadline_s: float = 30.0,
        max_batch: int = 512,
        max_pending: int = 1024,
        pace_s: float = 0.0,
    ) -> None:
        self._store = store
        self._pace_s = pace_s
        self._sent_at = float("-inf")
        """When the latest batch left (the loop's clock)."""
        self._worker_id = worker_id
        self._deadline_s = deadline_s
        self._max_batch = max_batch
        self._max_pending = max_pending
        self._queue: list[_Append] = []
        self._wake = asyncio.Event()
        self._waiting: deque[asyncio.Future[None]] = deque()
        """Jobs waiting in `room()`, first come first served."""
        self._closed = False
        self._backoff = Backoff()
        self._task = Supervisor()

    def start(self) -> None:
        self._task.start(self._run, "chunk-writer")

    async def close(self) -> None:
        """Stop writing; what is still queued is reported failed."""
        await self._task.close()
        self._closed = True
        self._release(len(self._waiting))
        queue, self._queue = self._queue, []
        for item in queue:
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

    def append(
        self, message_id: str, attempt: int, seq: int, frame: str, written: Written, earlier: Earlier | None = None
    ) -> None:
        """Queue a fenced chunk write; `written` learns whether it was written, or refused
        because the message was cancelled or is no longer this worker's, or failed.
        `earlier`: the message's earlier frames, for a store that lost some (see above)."""
        self._queue.append(_Append(message_id, attempt, seq, frame, written, earlier))
        self._wake.set()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                await self._paced()
                self._sent_at = asyncio.get_running_loop().time()
                batch, self._queue = self._queue[: self._max_batch], self._queue[self._max_batch :]
                self._release(self._max_pending - len(self._queue))
                again = await self._write(batch)
                if again:
                    self._queue[:0] = again
                    await self._backoff.wait()
                else:
                    self._backoff.reset()
            self._release(len(self._waiting))  # all written: a job woken that wrote nothing left its place unused

    async def _paced(self) -> None:
        """Wait until `pace_s` has passed since the latest batch left, unless a full batch is
        waiting; chunks that come meanwhile leave with it."""
        wait = self._sent_at + self._pace_s - asyncio.get_running_loop().time()
        if wait > 0 and len(self._queue) < self._max_batch:
            await asyncio.sleep(wait)

    async def _write(self, batch: list[_Append]) -> list[_Append]:
        """Write a batch; returns the items to send again, in order."""
        commands = [
            self._store.append_command(item.message_id, self._worker_id, item.attempt, item.seq, item.frame)
            for item in batch
        ]
        try:
            replies = await self._store.lean.execute(commands)
        except REDIS_ERRORS as exc:
            log.warning("chunk_write_retry", error=str(exc), chunks=len(batch))
            return self._refused(batch, exc)
        again: list[_Append] = []
        reload = False
        behind: set[str] = set()
        for item, reply in zip(batch, replies):
            try:
                result, stored = append_outcome(reply)
            except redis.exceptions.NoScriptError:
                reload = True
                again.append(item)
                continue
            except redis.exceptions.ResponseError as exc:
                log.warning("chunk_write_refused", error=str(exc), message_id=item.message_id, seq=item.seq)
                item.refused_since = item.refused_since or time.monotonic()
                again.append(item)
                continue
            if result == "out_of_order":  # an earlier chunk is missing: resent after it
                if stored is not None and item.message_id not in behind:
                    behind.add(item.message_id)
                    again.extend(self._lost_before(item, stored, again))
                item.refused_since = item.refused_since or time.monotonic()
                again.append(item)
            else:
                item.report(result)
        if reload:
            try:
                await self._store.load_append_script()
            except REDIS_ERRORS as exc:
                log.warning("script_load_retry", error=str(exc))
        return self._past_deadline(again)

    def _lost_before(self, item: _Append, stored: int, again: list[_Append]) -> list[_Append]:
        """The chunks between the store's last seq and `item` that nothing queued or about to
        be retried will write (the store lost them), from the job's own copy."""
        pending = {a.seq for a in (*again, *self._queue) if a.message_id == item.message_id}
        lost: list[_Append] = []
        for seq in range(stored + 1, item.seq):
            if seq in pending:
                continue
            frame = item.earlier(seq) if item.earlier is not None else None
            if frame is None:
                return []  # not ours to rebuild: the item waits, then fails at its deadline
            lost.append(_Append(item.message_id, item.attempt, seq, frame, _rewritten, item.earlier))
        if lost:
            log.warning("chunks_rewritten", message_id=item.message_id, first=lost[0].seq, last=lost[-1].seq)
        return lost

    def _refused(self, items: list[_Append], error: BaseException) -> list[_Append]:
        now = time.monotonic()
        for item in items:
            item.refused_since = item.refused_since or now
        return self._past_deadline(items, error)

    def _past_deadline(self, items: list[_Append], error: BaseException | None = None) -> list[_Append]:
        """Report the items refused for too long, and every later item of their messages;
        return the others."""
        now = time.monotonic()
        failed: set[str] = set()
        kept: list[_Append] = []
        for item in items:
            expired = item.refused_since is not None and now - item.refused_since >= self._deadline_s
            if item.message_id in failed or expired:
                failed.add(item.message_id)
                item.report(DeadlinePassed(f"redis refused the chunk write for {self._deadline_s:g} s: {error}"))
            else:
                kept.append(item)
        if failed:
            # chunks of a failed message still queued would be refused as out of order for ever
            queued, self._queue = self._queue, []
            for item in queued:
                if item.message_id in failed:
                    item.report(DeadlinePassed("an earlier chunk of this message could not be written"))
                else:
                    self._queue.append(item)
        return kept
