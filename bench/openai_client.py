"""The `openai_edge` client mode of `bench.clients`: the same chats through the WebSocket edge
and the OpenAI-compatible HTTP edge, and Stops by closing the HTTP connection.

Both sides use a minimal client, so that the figures are the gateway's edges and not two
client libraries: `picows` for the WebSocket (`bench.cancels.Conn`) and a bare HTTP/1.1
keep-alive connection (an asyncio protocol that parses the chunked body and its
server-sent events) for HTTP. Each frame or event is stamped in the transport's receive
callback.

CONFIG: `ws_port`, `http_port`. Commands (one line each, a JSON payload after the name):
- `pair {"max_tokens": N, "http_first": bool[, "prompts": [ws, http], "temperature": T]}`: one
  chat on each edge, one after the other; prints `pair` with each side's time to first token,
  end, tokens (words), chunks and finish reason.
- `load {"edge": "ws"|"http", "streams": N, "max_tokens": M}`: N chats at once on one edge,
  one connection each; prints `load` with the wall time from the first send to the last end,
  the tokens, and each chat's time to first token.
- `disconnect {"wait_chunks": K}`: a streamed chat completion of 2,000 tokens, its connection
  closed (FIN) after the K-th text chunk; prints `stopped` with the message id and the
  wall-clock time of the close.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, cast

import msgspec

from bench.cancels import Conn
from bench.clientio import TERMINALS, emit, next_command, stdin_lines, tokens_in

PROMPT = "tell me a story"
DONE = b"[DONE]"


class _Delta(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    delta: _Delta
    finish_reason: str | None = None


class _ChatChunk(msgspec.Struct):
    id: str = ""
    choices: list[_Choice] = []


_decode_chunk = msgspec.json.Decoder(_ChatChunk).decode


class SseConnection(asyncio.Protocol):
    """One HTTP/1.1 connection to the HTTP edge: requests one at a time; each response's
    event payloads (`data:` lines) go to `events` stamped on arrival, then `DONE` (or
    `b"HTTP <status>"` for a response that is not an event stream)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.events: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        self._buffer = b""
        self._in_body = False
        self._length: int | None = None
        """Content-Length of a plain response; None while reading a chunked one."""
        self._status = 0
        self._events = b""
        self.closed = asyncio.get_running_loop().create_future()

    @classmethod
    async def open(cls, port: int) -> SseConnection:
        _transport, conn = await asyncio.get_running_loop().create_connection(cls, "127.0.0.1", port)
        return conn

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)

    def post(self, path: str, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        assert self.transport is not None
        self.transport.write(
            f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nAuthorization: Bearer bench\r\n"
            f"Content-Length: {len(data)}\r\n\r\n".encode() + data)

    def data_received(self, data: bytes) -> None:
        stamp = time.perf_counter()
        self._buffer += data
        while self._parse(stamp):
            pass

    def _parse(self, stamp: float) -> bool:
        """Take one step (head, chunk or plain body) from the buffer; False when it needs more."""
        if not self._in_body:
            head, found, rest = self._buffer.partition(b"\r\n\r\n")
            if not found:
                return False
            lines = head.decode("latin-1").split("\r\n")
            self._status = int(lines[0].split()[1])
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
            self._length = None if headers.get("transfer-encoding") == "chunked" else int(headers.get("content-length", 0))
            self._buffer, self._in_body = rest, True
            return True
        if self._length is not None:
            if len(self._buffer) < self._length:
                return False
            self._buffer = self._buffer[self._length:]
            self._in_body = False
            self.events.put_nowait((stamp, f"HTTP {self._status}".encode()))
            return True
        size_line, found, rest = self._buffer.partition(b"\r\n")
        if not found:
            return False
        size = int(size_line.split(b";")[0], 16)
        if len(rest) < size + 2:
            return False
        self._buffer = rest[size + 2:]
        if size == 0:
            self._in_body = False
            return True
        self._events += rest[:size]
        *complete, self._events = self._events.split(b"\n\n")
        for event in complete:
            for line in event.split(b"\n"):
                if line.startswith(b"data: "):
                    self.events.put_nowait((stamp, line[6:]))
        return True

    async def chat(self, max_tokens: int, wait_chunks: int = 0, prompt: str = PROMPT,
                   temperature: float | None = None) -> dict[str, Any]:
        """A streamed chat completion: times from the request's send, seconds. `wait_chunks`:
        stop reading after that many text chunks (the caller closes the connection)."""
        body: dict[str, Any] = {"model": "any", "messages": [{"role": "user", "content": prompt}],
                                "max_tokens": max_tokens, "stream": True}
        if temperature is not None:
            body["temperature"] = temperature
        self.post("/v1/chat/completions", body)
        sent = time.perf_counter()
        record: dict[str, Any] = {"first_s": None, "chunks": 0, "tokens": 0, "message_id": ""}
        while True:
            stamp, payload = await asyncio.wait_for(self.events.get(), 60)
            if payload == DONE:
                record.update(end_s=stamp - sent, end_at=stamp)
                return record
            if payload.startswith(b"HTTP "):
                raise RuntimeError(f"refused: {payload.decode()}")
            chunk = _decode_chunk(payload)
            record["message_id"] = chunk.id.removeprefix("chatcmpl-")
            if chunk.choices and chunk.choices[0].finish_reason:
                record["finish_reason"] = chunk.choices[0].finish_reason
            text = chunk.choices[0].delta.content if chunk.choices else None
            if text:
                if record["first_s"] is None:
                    record["first_s"] = stamp - sent
                record["chunks"] += 1
                record["tokens"] += tokens_in(text)
                if record["chunks"] == wait_chunks:
                    return record

    async def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        await self.closed


async def ws_chat(conn: Conn, session: str, max_tokens: int, prompt: str = PROMPT,
                  temperature: float | None = None) -> dict[str, Any]:
    chat: dict[str, Any] = {"type": "chat", "session_id": session, "text": prompt, "max_tokens": max_tokens}
    if temperature is not None:
        chat["temperature"] = temperature
    conn.send(chat)
    sent = time.perf_counter()
    record: dict[str, Any] = {"first_s": None, "chunks": 0, "tokens": 0}
    while True:
        stamp, frame = await conn.next(lambda f: True, 60)
        if frame.type == "chunk":
            if record["first_s"] is None:
                record["first_s"] = stamp - sent
            record["chunks"] += 1
            record["tokens"] += tokens_in(frame.text)
        elif frame.type in TERMINALS and frame.message_id is not None:
            record.update(end_s=stamp - sent, end_at=stamp, terminal=frame.type, finish_reason=frame.finish_reason)
            return record
        elif frame.type == "error":
            raise RuntimeError(f"refused: {frame}")


async def disconnect(http_port: int, wait_chunks: int) -> dict[str, Any]:
    conn = await SseConnection.open(http_port)
    record = await conn.chat(2000, wait_chunks)
    closed = time.time()
    await conn.close()
    return {"message_id": record["message_id"], "closed_wall": closed}


async def load(args: dict[str, Any], ws_port: int, http_port: int, serial: int) -> dict[str, Any]:
    streams, tokens = int(args["streams"]), int(args["max_tokens"])
    if args["edge"] == "ws":
        sockets = await asyncio.gather(*(Conn.open(ws_port, "anonymous") for _ in range(streams)))
        started = time.perf_counter()
        records = await asyncio.gather(*(ws_chat(s, f"load-{serial}-{i}", tokens) for i, s in enumerate(sockets)))
        await asyncio.gather(*(s.close_and_wait() for s in sockets))
    else:
        conns = await asyncio.gather(*(SseConnection.open(http_port) for _ in range(streams)))
        started = time.perf_counter()
        records = await asyncio.gather(*(c.chat(tokens) for c in conns))
        await asyncio.gather(*(c.close() for c in conns))
    return {"wall_s": max(r["end_at"] for r in records) - started, "tokens": sum(r["tokens"] for r in records),
            "first_s": [r["first_s"] for r in records]}


async def openai_edge(config: dict[str, Any]) -> None:
    commands = await stdin_lines()
    ws_port, http_port = int(config["ws_port"]), int(config["http_port"])
    ws = await Conn.open(ws_port, "anonymous")
    http = await SseConnection.open(http_port)
    emit("ready")
    serial = 0
    try:
        while True:
            command, _, payload = (await next_command(commands)).partition(" ")
            args: dict[str, Any] = json.loads(payload or "{}")
            serial += 1
            match command:
                case "pair":
                    tokens, temperature = int(args["max_tokens"]), args.get("temperature")
                    prompts = args.get("prompts") or [PROMPT, PROMPT]
                    if args.get("http_first"):
                        over_http = await http.chat(tokens, prompt=prompts[1], temperature=temperature)
                        over_ws = await ws_chat(ws, f"pair-{serial}", tokens, prompts[0], temperature)
                    else:
                        over_ws = await ws_chat(ws, f"pair-{serial}", tokens, prompts[0], temperature)
                        over_http = await http.chat(tokens, prompt=prompts[1], temperature=temperature)
                    emit("pair", {"ws": over_ws, "http": over_http})
                case "load":
                    emit("load", await load(args, ws_port, http_port, serial))
                case "disconnect":
                    emit("stopped", await disconnect(http_port, int(args["wait_chunks"])))
                case _:
                    break
    finally:
        await ws.close_and_wait()
        await http.close()
    emit("result")
