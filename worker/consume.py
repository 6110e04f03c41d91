"""Reading jobs from the job streams (one per shard) into a worker's free slots.

A job is read only when a slot is free for it, so the consumer group keeps the rest for other
workers. With one stream, one blocking XREADGROUP asks for as many jobs as there are free slots.
With several (a sharded deployment, where one command cannot span streams of different hash
slots), there are at most as many blocking reads at a time as free slots, each on a different
stream and for one job, so a worker never holds more jobs than it can start; the streams are
taken in turn, and while there are fewer free slots than streams each read blocks for a share of
`block_ms`, so every stream is visited about once per `block_ms`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

import structlog

from store.retry import REDIS_ERRORS, Backoff
from store.topology import AnyRedis

log = structlog.get_logger("worker.consume")

Entries = list[tuple[bytes, dict[bytes, bytes]]]
MIN_BLOCK_MS = 50


class Consumer:
    def __init__(
        self,
        redis: AnyRedis,
        streams: Sequence[str],
        group: str,
        name: str,
        *,
        free_slots: Callable[[], int],
        on_entries: Callable[[str, Entries], None],
        ensure_group: Callable[[str], Awaitable[None]],
        block_ms: int = 1_000,
    ) -> None:
        self._redis = redis
        self._streams = list(streams)
        self._group = group
        self._name = name
        self._free_slots = free_slots
        self._on_entries = on_entries
        self._ensure_group = ensure_group
        self._block_ms = block_ms
        self._next = 0
        self._backoff = Backoff()
        self.slot_freed = asyncio.Event()
        """Set by the worker whenever a job ends."""

    async def run(self) -> None:
        readers: dict[asyncio.Task[None], str] = {}
        try:
            while True:
                free = self._free_slots() - len(readers)
                reading = set(readers.values())
                for stream in self._turn(min(free, len(self._streams) - len(reading)), reading):
                    readers[asyncio.create_task(self._read(stream, free), name=f"read-{stream}")] = stream
                self.slot_freed.clear()
                waiter = asyncio.ensure_future(self.slot_freed.wait())
                await asyncio.wait({*readers, waiter}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                for task in [t for t in readers if t.done()]:
                    del readers[task]
                    task.result()
        finally:
            for task in readers:
                task.cancel()
            await asyncio.gather(*readers, return_exceptions=True)

    def _turn(self, count: int, busy: set[str]) -> list[str]:
        """The next `count` streams not being read, in turn."""
        chosen: list[str] = []
        for _ in range(len(self._streams)):
            if len(chosen) >= count:
                break
            stream = self._streams[self._next]
            self._next = (self._next + 1) % len(self._streams)
            if stream not in busy:
                chosen.append(stream)
        return chosen

    async def _read(self, stream: str, free: int) -> None:
        """One blocking read on `stream`: as many jobs as are free with one stream, else one."""
        sharded = len(self._streams) > 1
        count = 1 if sharded else max(free, 1)
        block = self._block_ms
        if sharded and free < len(self._streams):
            block = max(MIN_BLOCK_MS, self._block_ms * max(free, 1) // len(self._streams))
        try:
            reply = await self._redis.xreadgroup(self._group, self._name, {stream: ">"}, count=count, block=block)
        except REDIS_ERRORS as exc:
            if "NOGROUP" in str(exc):
                await self._ensure_group(stream)
                return
            delay = await self._backoff.wait()
            log.warning("consume_retry", stream=stream, error=str(exc), backoff_s=round(delay, 3))
            return
        self._backoff.reset()
        streams: list[tuple[bytes, Entries]] = reply or []  # type: ignore[assignment]
        for _stream, entries in streams:
            self._on_entries(stream, entries)
