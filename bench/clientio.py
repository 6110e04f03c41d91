"""What every benchmark client process shares: the frame fields they read, the line protocol
with the benchmark (`TAG {json}` lines out on stdout, commands in on stdin), and the base of
the `picows` connections."""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time
from typing import Any

import msgspec
from picows import WSFrame, WSListener, WSMsgType, WSTransport

TERMINALS = frozenset({"done", "cancelled", "error"})


class Frame(msgspec.Struct):
    """The fields of a server frame the clients look at (the rest is ignored)."""

    type: str
    message_id: str | None = None
    seq: int = 0
    text: str = ""
    status: str | None = None
    code: str | None = None
    finish_reason: str | None = None
    ts: float | None = None


decode_frame = msgspec.json.Decoder(Frame).decode


def emit(tag: str, payload: dict[str, Any] | None = None) -> None:
    sys.stdout.write(f"{tag} {json.dumps(payload or {})}\n")
    sys.stdout.flush()


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


async def stdin_lines() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def next_command(reader: asyncio.StreamReader) -> str:
    line = await reader.readline()
    return line.decode().strip() or "stop"  # end of stdin: the benchmark went away


def tokens_in(text: str) -> int:
    """Synthetic tokens are words that end with a space."""
    return text.count(" ")


class Listener(WSListener):
    """A `picows` client connection: JSON text frames out, decoded frames in through
    `on_message` with their arrival time, taken in the transport's receive callback. A
    close frame from the gateway is answered and the connection dropped."""

    def __init__(self) -> None:
        self.transport: WSTransport | None = None

    def on_message(self, frame: Frame, stamp: float) -> None:
        raise NotImplementedError

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        stamp = time.perf_counter()
        match frame.msg_type:
            case WSMsgType.TEXT:
                self.on_message(decode_frame(frame.get_payload_as_memoryview()), stamp)
            case WSMsgType.CLOSE:
                transport.send_close(frame.get_close_code())
                transport.disconnect()
            case _:
                pass

    def send(self, message: dict[str, Any]) -> None:
        """Framed and written at once; nothing once this side has sent its close frame."""
        if self.transport is not None and not self.transport.is_close_frame_sent:
            self.transport.send(WSMsgType.TEXT, json.dumps(message).encode())

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_close_frame_sent:
            self.transport.send_close()
            self.transport.disconnect()
