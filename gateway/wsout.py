"""Writing one text frame to a websockets connection without waiting (public API only).

`websockets.asyncio.server.broadcast` writes a message synchronously and applies no
backpressure; the size of the connection's write buffer (`transport.get_write_buffer_size()`,
as websockets' broadcasting guide suggests for per-client queues) says whether there is room.
A relay uses this for the next frame of a stream when nothing waits ahead of it, which saves
a task switch per frame; anything that finds no room takes the awaited `send`.
"""

from __future__ import annotations

import socket

from websockets.asyncio.server import ServerConnection, broadcast
from websockets.protocol import State


class WebSocketSink:
    """The `FrameSink` of a WebSocket connection."""

    def __init__(self, ws: ServerConnection, high_water: int) -> None:
        self.ws = ws
        self.high_water = high_water
        """Bytes in the write buffer at or above which `send_now` declines (the server's
        `write_limit`, where `send` would start waiting)."""

    async def send(self, message: str) -> None:
        await self.ws.send(message)

    def send_now(self, frame: bytes) -> bool:
        """Write the frame (UTF-8 JSON, sent as a text frame as it is) at once if the
        connection is open and its buffer has room."""
        if self.ws.state is not State.OPEN or self.ws.transport.get_write_buffer_size() >= self.high_water:
            return False
        broadcast((self.ws,), frame, text=True)
        return True


def set_send_buffer(ws: ServerConnection, size: int) -> None:
    """Set the client socket's SO_SNDBUF (the kernel's buffer behind websockets' own)."""
    sock = ws.transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
