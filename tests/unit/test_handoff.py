"""The thread → event loop hand-off of the llama engine (a real thread, no network)."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from worker.engines.handoff import Handoff

TIMEOUT = 5.0


def in_thread(target: object) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)  # type: ignore[arg-type]
    thread.start()
    return thread


async def test_first_item_goes_at_once_and_a_burst_waits_for_the_window() -> None:
    loop = asyncio.get_running_loop()
    window = 0.2
    handoff: Handoff[str] = Handoff(loop, window)
    begun = loop.time()
    in_thread(lambda: handoff.put("a"))
    async with asyncio.timeout(TIMEOUT):
        assert await handoff.take() == ["a"]
    first_at = loop.time()
    assert first_at - begun < window  # not held back for a window

    def burst() -> None:
        for piece in ("b", "c", "d"):
            handoff.put(piece)

    in_thread(burst)
    async with asyncio.timeout(TIMEOUT):
        assert await handoff.take() == ["b", "c", "d"]  # one wake-up for the whole burst
    assert loop.time() - first_at >= window - 0.002  # released at the end of the window


async def test_urgent_item_is_released_without_waiting_for_the_window() -> None:
    loop = asyncio.get_running_loop()
    handoff: Handoff[str] = Handoff(loop, window_s=3600.0)
    in_thread(lambda: handoff.put("a"))
    async with asyncio.timeout(TIMEOUT):
        assert await handoff.take() == ["a"]

    def end() -> None:
        handoff.put("b")
        handoff.put("end", urgent=True)

    in_thread(end)
    async with asyncio.timeout(TIMEOUT):  # an hour-long window would time this out
        assert await handoff.take() == ["b", "end"]
    handoff.close()


async def test_fast_producer_wakes_the_loop_about_once_per_window() -> None:
    loop = asyncio.get_running_loop()
    window = 0.02
    handoff: Handoff[int] = Handoff(loop, window, max_items=10_000)
    count = 300

    def produce() -> None:
        for n in range(count):
            handoff.put(n)
            time.sleep(0.0005)
        handoff.put(-1, urgent=True)

    begun = loop.time()
    in_thread(produce)
    received: list[int] = []
    takes = 0
    async with asyncio.timeout(TIMEOUT * 4):
        while not received or received[-1] != -1:
            received.extend(await handoff.take())
            takes += 1
    elapsed = loop.time() - begun
    assert received == [*range(count), -1]
    assert takes <= elapsed / window + 3, (takes, elapsed)
    assert takes < count / 5


async def test_a_steady_producer_does_not_wake_the_loop_once_it_is_ticking(monkeypatch: pytest.MonkeyPatch) -> None:
    loop = asyncio.get_running_loop()
    wakes: list[object] = []
    original = loop.call_soon_threadsafe

    def counting(callback: Any, *args: Any) -> asyncio.Handle:
        wakes.append(callback)
        return original(callback, *args)

    monkeypatch.setattr(loop, "call_soon_threadsafe", counting)
    handoff: Handoff[int] = Handoff(loop, window_s=0.02, max_items=10_000)

    def produce() -> None:
        for n in range(200):
            handoff.put(n)
            time.sleep(0.0005)
        handoff.put(-1, urgent=True)

    in_thread(produce)
    received: list[int] = []
    async with asyncio.timeout(TIMEOUT * 4):
        while not received or received[-1] != -1:
            received.extend(await handoff.take())
    assert received == [*range(200), -1]
    # the first item, the second (which starts the ticks), the end; a stall of the producer
    # thread longer than a window would add one more
    assert len(wakes) <= 6, len(wakes)


async def test_bounded_producer_waits_for_the_consumer() -> None:
    loop = asyncio.get_running_loop()
    handoff: Handoff[int] = Handoff(loop, window_s=0.0, max_items=3)
    waiting: list[int] = []
    done = threading.Event()

    def produce() -> None:
        for n in range(20):
            handoff.wait_for_room(lambda: False)
            handoff.put(n)
            waiting.append(len(handoff._items))
        done.set()

    in_thread(produce)
    received: list[int] = []
    async with asyncio.timeout(TIMEOUT):
        while len(received) < 20:
            received.extend(await handoff.take())
    assert received == list(range(20))
    assert done.wait(TIMEOUT)
    assert max(waiting) <= 3


async def test_a_stopped_producer_stops_waiting_for_room() -> None:
    loop = asyncio.get_running_loop()
    handoff: Handoff[int] = Handoff(loop, window_s=0.0, max_items=1)
    stopped = threading.Event()
    handoff.put(0)
    returned = threading.Event()

    def produce() -> None:
        handoff.wait_for_room(stopped.is_set)  # full, and nobody takes
        returned.set()

    thread = in_thread(produce)
    assert not returned.wait(0.05)
    stopped.set()
    handoff.wake_producer()
    assert returned.wait(TIMEOUT)
    thread.join(TIMEOUT)
