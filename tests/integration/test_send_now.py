"""`send_now` on a real websockets connection: frames go out whole and in order, and it
steps aside (nothing written) while the socket's buffer is over its limit or a send waits."""

from __future__ import annotations

import asyncio

from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from gateway.connection import SendChannel, WebSocketSink
from tests.support import t


async def test_send_now_writes_until_the_buffer_is_full_then_send_waits_and_order_holds() -> None:
    results: asyncio.Queue[tuple[list[int], int, bool]] = asyncio.Queue()
    release = asyncio.Event()

    async def handler(ws: ServerConnection) -> None:
        channel = SendChannel(WebSocketSink(ws), timeout_s=t(30))
        sent: list[int] = []
        frame = 0
        while len(sent) < 100_000:
            frame += 1
            if not channel.send_now(b'{"n":%d,"pad":"%s"}' % (frame, b"x" * 1000)):
                break
            sent.append(frame)
        refused = frame
        waiting = asyncio.create_task(channel.send(b'{"n":%d,"pad":""}' % refused))
        await asyncio.sleep(0)
        blocked = not waiting.done()
        assert channel.send_now(b'{"n":-1}') is False, "a waiting send holds the lock"
        await results.put((sent, refused, blocked))
        await release.wait()
        await waiting
        assert channel.send_now(b'{"n":%d}' % (refused + 1))
        await ws.wait_closed()

    async with serve(handler, "127.0.0.1", 0, write_limit=4096, compression=None) as server:
        port = server.sockets[0].getsockname()[1]
        async with connect(f"ws://127.0.0.1:{port}", compression=None, max_queue=None) as client:
            sent, refused, blocked = await asyncio.wait_for(results.get(), t(10))
            assert sent == list(range(1, refused)) and 0 < len(sent) < 100_000, "the buffer limit stops it"
            assert blocked, "the frame send_now refused waits for buffer room"
            release.set()
            got = []
            async with asyncio.timeout(t(10)):
                while len(got) < refused + 1:
                    message = await client.recv()
                    assert isinstance(message, str), "text frames"
                    got.append(int(message.split(",")[0].split(":")[1].rstrip("}")))
            assert got == list(range(1, refused + 2))


async def test_send_now_refuses_once_the_connection_is_closing() -> None:
    outcome: asyncio.Queue[bool] = asyncio.Queue()

    async def handler(ws: ServerConnection) -> None:
        channel = SendChannel(WebSocketSink(ws), timeout_s=t(5))
        await ws.wait_closed()
        await outcome.put(channel.send_now(b'{"late":true}'))

    async with serve(handler, "127.0.0.1", 0, compression=None) as server:
        port = server.sockets[0].getsockname()[1]
        async with connect(f"ws://127.0.0.1:{port}", compression=None):
            pass
        assert await asyncio.wait_for(outcome.get(), t(10)) is False
