"""The send lock: concurrent senders on one connection never interleave frames."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway import SlowConsumer
from gateway.connection import SendChannel


class SplitWriter:
    """Writes each frame in two halves with a yield between them, like a socket under
    back-pressure: without a lock, another sender's frame would land in the middle."""

    def __init__(self) -> None:
        self.stream: list[str] = []

    async def send(self, message: str) -> None:
        half = len(message) // 2
        self.stream.append(message[:half])
        await asyncio.sleep(0)
        self.stream.append(message[half:])


async def test_many_concurrent_senders_frames_whole_and_in_per_sender_order() -> None:
    sink = SplitWriter()
    channel = SendChannel(sink, timeout_s=5.0)

    async def sender(name: str, count: int) -> None:
        for i in range(count):
            await channel.send(f"<{name}:{i:04d}>")

    senders = [sender(f"chunk{n}", 200) for n in range(8)] + [sender("heartbeat", 100)]
    await asyncio.gather(*senders)
    frames = [a + b for a, b in zip(sink.stream[::2], sink.stream[1::2])]
    assert all(f.startswith("<") and f.endswith(">") and f.count("<") == 1 for f in frames)
    assert len(frames) == 8 * 200 + 100
    by_sender: dict[str, list[int]] = {}
    for frame in frames:
        name, index = frame[1:-1].split(":")
        by_sender.setdefault(name, []).append(int(index))
    assert by_sender["heartbeat"] == list(range(100))
    assert all(by_sender[f"chunk{n}"] == list(range(200)) for n in range(8))


async def test_without_the_lock_the_same_writer_interleaves() -> None:
    """Proves the test above can fail: the hazard is real for this writer."""
    sink = SplitWriter()
    await asyncio.gather(*(sink.send(f"<{n}>") for n in range(4)))
    frames = [a + b for a, b in zip(sink.stream[::2], sink.stream[1::2])]
    assert any(f.count("<") != 1 for f in frames)


class StuckWriter:
    async def send(self, message: str) -> None:
        await asyncio.Event().wait()


async def test_a_send_that_stays_blocked_is_reported_stalled_after_the_timeout() -> None:
    channel = SendChannel(StuckWriter(), timeout_s=5.0)
    sending = asyncio.create_task(channel.send("x"))
    await asyncio.sleep(0)
    now = time.monotonic()
    assert not channel.stalled(now)
    assert channel.stalled(now + 5.1)
    channel.closed_slow = True
    sending.cancel()
    await asyncio.gather(sending, return_exceptions=True)
    assert not channel.stalled(now + 5.1)
    with pytest.raises(SlowConsumer):
        await channel.send("y")
