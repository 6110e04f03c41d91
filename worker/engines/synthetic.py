"""Deterministic text at a fixed rate, for load tests and benchmarks.

Emits exactly `max_tokens` tokens at `rate` tokens per second, then `Finish("length")`, whatever
the request's history and sampling fields. The pause between tokens wakes at once on cancel,
so a cancel costs no more than one timer hop.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import AsyncIterator

from worker.cancel_token import CancelToken, Phase
from worker.engines.base import Finish, GenerationRequest

WORDS = (
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november "
    "oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu"
).split()


def synthetic_token(message_id: str, index: int) -> str:
    """The index-th token of a message: the same for every worker and every run."""
    return _token(_seed(message_id), index)


def _seed(message_id: str) -> int:
    return zlib.crc32(message_id.encode())


def _token(seed: int, index: int) -> str:
    return WORDS[(seed + index * 7) % len(WORDS)] + " "


class _Pacer:
    """`sleep` that returns early once `stop` is called (both on the event loop)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._waiter: asyncio.Future[None] | None = None
        self.stopped = False

    def stop(self) -> None:
        self.stopped = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def sleep(self, delay: float) -> None:
        if self.stopped:
            return
        if delay <= 0:
            await asyncio.sleep(0)  # overdue tokens still let the loop breathe
            return
        waiter = self._loop.create_future()
        self._waiter = waiter
        handle = self._loop.call_later(delay, _release, waiter)
        try:
            await waiter
        finally:
            handle.cancel()
            self._waiter = None


def _release(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    """True in the thread that runs `loop`."""
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


class SyntheticEngine:
    name = "synthetic"
    model = "synthetic"
    coalesces = False

    def __init__(self, rate: float = 20.0) -> None:
        self.rate = rate

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def generate(
        self, request: GenerationRequest, token: CancelToken
    ) -> AsyncIterator[str | Finish]:
        loop = asyncio.get_running_loop()
        pacer = _Pacer(loop)

        def wake(_token: CancelToken) -> None:
            if _on_loop(loop):
                pacer.stop()  # a pushed cancel: no self-pipe write, no extra loop wake-up
            else:
                loop.call_soon_threadsafe(pacer.stop)

        token.add_callback(wake)
        token.set_phase(Phase.GENERATING)
        interval = 1.0 / self.rate if self.rate > 0 else 0.0
        started = loop.time()
        seed = _seed(request.message_id)
        for index in range(request.max_tokens):
            if interval:
                await pacer.sleep(started + index * interval - loop.time())
            elif index % 64 == 63:
                await asyncio.sleep(0)
            if token.cancelled:
                return
            yield _token(seed, index)
        token.set_phase(Phase.FINISHED)
        yield Finish("length")
