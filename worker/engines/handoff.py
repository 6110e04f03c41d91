"""Items from a generation thread to the event loop, waking the loop at most once per window.

Handing over every token with `call_soon_threadsafe` wakes the event loop once per token, and
each wake-up takes the GIL from the thread that runs the model, which slows a fast model
(docs/PERFORMANCE.md). Here the thread appends to a deque and wakes the loop only
when no wake-up is already on its way; the loop releases what has gathered at once if the
previous release is at least `window_s` old, else at the end of that window (the same rule as
`protocol.coalesce`). While items keep coming, the loop's own tick at the end of each window
releases them and the thread does not wake it at all; a tick that finds nothing goes quiet. So
the first token after a pause goes out at once, a slow engine costs one wake-up per token, and
a fast one one per window.

The deque is bounded: past `max_items`, the thread waits for the loop to take them (a stalled
consumer, e.g. a worker whose Redis writes are backed up, slows the model instead of filling
memory); `stopped()` ends the wait, and `wake_producer` lets a cancel end it at once.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")

_PRODUCER_POLL_S = 0.1
"""How often a waiting producer re-checks `stopped()` if nobody wakes it."""


class Handoff(Generic[T]):
    def __init__(self, loop: asyncio.AbstractEventLoop, window_s: float, max_items: int = 256) -> None:
        self._loop = loop
        self._window_s = window_s
        self._max_items = max_items
        self._items: deque[T] = deque()
        self._wake_pending = False
        """True while a release is coming (the loop was woken, or its next tick is armed):
        the thread then need not wake the loop."""
        self._released_at = float("-inf")
        self._timer: asyncio.TimerHandle | None = None
        self._ready = asyncio.Event()
        self._room = threading.Event()
        self._room.set()

    # thread side

    def put(self, item: T, *, urgent: bool = False) -> None:
        """Queue `item`; `urgent` ones (the end of a job) are released at once."""
        self._items.append(item)
        if urgent:
            self._loop.call_soon_threadsafe(self._release, False)
        elif not self._wake_pending:
            self._wake_pending = True
            self._loop.call_soon_threadsafe(self._on_wake)

    def wait_for_room(self, stopped: Callable[[], bool]) -> None:
        """Block the producer while `max_items` are waiting, until the loop takes some or
        `stopped()` is true."""
        while len(self._items) >= self._max_items and not stopped():
            self._room.clear()
            if len(self._items) < self._max_items:
                return
            self._room.wait(_PRODUCER_POLL_S)

    def wake_producer(self) -> None:
        """End a producer's wait for room now (thread-safe), e.g. on cancel."""
        self._room.set()

    # loop side

    def _on_wake(self) -> None:
        due = self._released_at + self._window_s
        if self._loop.time() >= due:
            self._release(False)
        elif self._timer is None:
            self._timer = self._loop.call_at(due, self._on_tick)

    def _on_tick(self) -> None:
        self._timer = None
        self._wake_pending = False  # before looking: an item appended from now on wakes the loop
        if self._items:
            self._release(True)

    def _release(self, keep_ticking: bool) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._released_at = now = self._loop.time()
        self._wake_pending = keep_ticking
        if keep_ticking:
            self._timer = self._loop.call_at(now + self._window_s, self._on_tick)
        self._ready.set()

    async def take(self) -> list[T]:
        """Wait for the next release and return every item waiting (at least one)."""
        while True:
            await self._ready.wait()
            self._ready.clear()
            if self._items:
                break
        count = len(self._items)  # the thread only appends: these `count` stay ours
        taken = [self._items.popleft() for _ in range(count)]
        self._room.set()
        return taken

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._room.set()
