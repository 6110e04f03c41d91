"""What `gateway.wsout` relies on in websockets: `broadcast` writes a text frame at once, and
the transport's write buffer tells when a client has stopped reading. An upgrade of
websockets that changes either fails here first."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from gateway.wsout import WebSocketSink, set_send_buffer

HIGH_WATER = 4096


@asynccontextmanager
async def server(handler: Callable[[WebSocketSink], Awaitable[None]]) -> AsyncIterator[int]:
    """A websockets server whose handler gets each connection's sink; yields its port."""

    async def handle(ws: ServerConnection) -> None:
        set_send_buffer(ws, 4096)
        await handler(WebSocketSink(ws, HIGH_WATER))
        await ws.wait_closed()

    async with serve(handle, "127.0.0.1", 0, write_limit=HIGH_WATER) as srv:
        yield srv.sockets[0].getsockname()[1]


async def test_send_now_writes_text_frames_in_order_with_awaited_sends() -> None:
    async def handler(sink: WebSocketSink) -> None:
        for i in range(50):
            if i % 5 == 0:
                await sink.send(json.dumps({"seq": i}))
            else:
                assert sink.send_now(json.dumps({"seq": i}).encode())

    async with server(handler) as port, connect(f"ws://127.0.0.1:{port}") as ws:
        frames = [await asyncio.wait_for(ws.recv(), 5) for _ in range(50)]
    assert all(isinstance(f, str) for f in frames)
    assert [json.loads(f)["seq"] for f in frames] == list(range(50))


async def test_send_now_declines_once_a_client_stops_reading_and_writes_again_when_it_reads() -> None:
    declined_after = asyncio.get_running_loop().create_future()
    resumed = asyncio.Event()
    frame = json.dumps({"pad": "x" * 1000})
    raw = frame.encode()

    async def handler(sink: WebSocketSink) -> None:
        written = 0
        while sink.send_now(raw):
            written += 1
            if written > 100_000:
                break
            await asyncio.sleep(0)
        declined_after.set_result(written)
        await resumed.wait()
        while not sink.send_now(raw):
            await asyncio.sleep(0.01)
        await sink.send("end")

    async with server(handler) as port, connect(f"ws://127.0.0.1:{port}", max_queue=1) as ws:
        ws.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        written = await asyncio.wait_for(declined_after, 10)
        # The kernel's buffers on both ends hold some frames; the gateway's memory for the
        # rest is bounded by the high-water mark, not by what the stream produces.
        assert 0 < written < 1000
        resumed.set()
        received = 0
        while (message := await asyncio.wait_for(ws.recv(), 10)) != "end":
            assert message == frame
            received += 1
        assert received == written + 1


async def test_send_now_declines_on_a_closing_connection() -> None:
    answers: asyncio.Future[tuple[bool, bool]] = asyncio.get_running_loop().create_future()

    async def handler(sink: WebSocketSink) -> None:
        before = sink.send_now(b"{}")
        await sink.ws.close()
        answers.set_result((before, sink.send_now(b"{}")))

    async with server(handler) as port, connect(f"ws://127.0.0.1:{port}") as ws:
        assert await asyncio.wait_for(ws.recv(), 5) == "{}"
        assert await asyncio.wait_for(answers, 5) == (True, False)
