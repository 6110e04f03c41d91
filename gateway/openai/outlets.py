"""Where the HTTP edge's relays deliver a message's log frames: as server-sent events of a
chat completion or a response, or collected for a whole answer.

Each is a `gateway.live.Outlet`: the relay hands it every frame once, in order (chunks, then
the terminal). Streamed events go through a `SendChannel` (the WebSocket edge's), whose
blocked send the edge's sweep notices when a client stops reading.
"""

from __future__ import annotations

from aiohttp import web

from gateway.connection import SendChannel
from protocol.messages import Chunk, Terminal, server_decoder
from protocol.openai import ChatCompletion, ResponseStream
from store.redis_store import Store


class SseSink:
    """A `FrameSink` onto a prepared streaming response; each "frame" is one or more events."""

    def __init__(self, response: web.StreamResponse) -> None:
        self.response = response

    async def send(self, message: str) -> None:
        await self.response.write(message.encode())

    def send_now(self, frame: bytes) -> bool:
        """Never: aiohttp's writes are awaited."""
        return False


def sse_response(request: web.Request) -> web.StreamResponse:
    """A streaming response for server-sent events (nginx must not buffer it)."""
    response = web.StreamResponse(headers={
        "Content-Type": "text/event-stream; charset=utf-8",
        "Cache-Control": "no-store",
        "X-Accel-Buffering": "no",
    })
    response.enable_chunked_encoding()
    return response


class Collector:
    """Collects a message's text and terminal (a whole, non-streamed answer)."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.terminal: Terminal | None = None

    async def send(self, frame: str | bytes) -> None:
        event = server_decoder.decode(frame)
        if isinstance(event, Chunk):
            self.parts.append(event.text)
        else:
            self.terminal = event  # type: ignore[assignment]  # a relay sends chunks and terminals only

    @property
    def text(self) -> str:
        return "".join(self.parts)


class ChatOutlet:
    """A chat completion's `chat.completion.chunk` events."""

    def __init__(self, channel: SendChannel, completion: ChatCompletion) -> None:
        self.channel = channel
        self.completion = completion
        self.terminal: Terminal | None = None

    async def send(self, frame: str | bytes) -> None:
        event = server_decoder.decode(frame)
        if isinstance(event, Chunk):
            await self.channel.send(self.completion.delta(event.text))
            return
        self.terminal = event  # type: ignore[assignment]
        await self.channel.send(self.completion.closing(event))  # type: ignore[arg-type]


class ResponseOutlet:
    """A response's stream events from log position `after_seq` on; the closing events need
    the whole text, read from the log when the stream did not start at its beginning."""

    def __init__(self, channel: SendChannel, events: ResponseStream, store: Store, after_seq: int) -> None:
        self.channel = channel
        self.events = events
        self.store = store
        self.whole = after_seq == 0
        self.parts: list[str] = []

    async def send(self, frame: str | bytes) -> None:
        event = server_decoder.decode(frame)
        if isinstance(event, Chunk):
            self.parts.append(event.text)
            if data := self.events.delta(event.seq, event.text):
                await self.channel.send(data)
            return
        if self.whole:
            text = "".join(self.parts)
        else:
            text = await self.store.partial_text(self.events.info.message_id)
        if data := self.events.closing(event, text):  # type: ignore[arg-type]
            await self.channel.send(data)
