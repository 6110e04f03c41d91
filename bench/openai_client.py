"""The `openai_edge` client mode of `bench.clients`: the same chats through the WebSocket edge
(`websockets`, no compression) and the OpenAI-compatible HTTP edge (aiohttp, server-sent
events), and Stops by closing the HTTP connection.

CONFIG: `ws_port`, `http_port`. Commands (one line each, a JSON payload after the name):
- `pair {"max_tokens": N, "http_first": bool}`: one chat on each edge, one after the other;
  prints `pair` with each side's time to first token, end, tokens and chunks.
- `load {"edge": "ws"|"http", "streams": N, "max_tokens": M}`: N chats at once on one edge;
  prints `load` with the wall time from the first send to the last end, the tokens, and each
  chat's time to first token.
- `disconnect {"wait_chunks": K}`: a streamed chat completion of 2,000 tokens, closed (FIN) after its
  K-th text chunk; prints `stopped` with the message id and the wall-clock time of the close.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import msgspec
from websockets.asyncio.client import ClientConnection, connect

from bench.clientio import TERMINALS, decode_frame, emit, next_command, stdin_lines, tokens_in

PROMPT = "tell me a story"


class _Delta(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    delta: _Delta
    finish_reason: str | None = None


class _ChatChunk(msgspec.Struct):
    id: str = ""
    choices: list[_Choice] = []


_decode_chunk = msgspec.json.Decoder(_ChatChunk).decode


async def ws_chat(ws: ClientConnection, session: str, max_tokens: int) -> dict[str, Any]:
    sent = time.perf_counter()
    await ws.send(json.dumps({"type": "chat", "session_id": session, "text": PROMPT, "max_tokens": max_tokens}))
    record: dict[str, Any] = {"first_s": None, "chunks": 0, "tokens": 0}
    async for raw in ws:
        frame = decode_frame(raw)
        if frame.type == "chunk":
            if record["first_s"] is None:
                record["first_s"] = time.perf_counter() - sent
            record["chunks"] += 1
            record["tokens"] += tokens_in(frame.text)
        elif frame.type in TERMINALS:
            record.update(end_s=time.perf_counter() - sent, terminal=frame.type)
            return record
        elif frame.type == "error":
            raise RuntimeError(f"refused: {raw!r}")
    raise ConnectionError("the WebSocket closed")


async def http_chat(session: aiohttp.ClientSession, max_tokens: int) -> dict[str, Any]:
    body = {"model": "synthetic", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens,
            "stream": True}
    sent = time.perf_counter()
    record: dict[str, Any] = {"first_s": None, "chunks": 0, "tokens": 0}
    async with session.post("/v1/chat/completions", json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"refused: {response.status} {await response.text()}")
        async for line in response.content:
            if not line.startswith(b"data: "):
                continue
            if line.startswith(b"data: [DONE]"):
                record["end_s"] = time.perf_counter() - sent
                return record
            chunk = _decode_chunk(line[6:])
            text = chunk.choices[0].delta.content if chunk.choices else None
            if text:
                if record["first_s"] is None:
                    record["first_s"] = time.perf_counter() - sent
                record["chunks"] += 1
                record["tokens"] += tokens_in(text)
            if chunk.choices and chunk.choices[0].finish_reason:
                record["terminal"] = chunk.choices[0].finish_reason
    raise ConnectionError("the stream ended without [DONE]")


async def stop_once(http_port: int, wait_chunks: int) -> dict[str, Any]:
    """A streamed chat completion on a connection of its own, closed after `wait_chunks`."""
    body = {"model": "synthetic", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 2000,
            "stream": True}
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(f"http://127.0.0.1:{http_port}", connector=connector) as session:
        response = await session.post("/v1/chat/completions", json=body)
        seen, mid = 0, ""
        async for line in response.content:
            if line.startswith(b"data: {"):
                chunk = _decode_chunk(line[6:])
                mid = chunk.id.removeprefix("chatcmpl-")
                if chunk.choices and chunk.choices[0].delta.content:
                    seen += 1
                    if seen == wait_chunks:
                        break
        closed = time.time()
        response.close()  # the connection is not reused: closed (FIN)
    return {"message_id": mid, "closed_wall": closed}


async def openai_edge(config: dict[str, Any]) -> None:
    commands = await stdin_lines()
    ws_port, http_port = int(config["ws_port"]), int(config["http_port"])
    connector = aiohttp.TCPConnector(limit=0)
    session = aiohttp.ClientSession(f"http://127.0.0.1:{http_port}", connector=connector)
    ws = await connect(f"ws://127.0.0.1:{ws_port}/ws", compression=None, ping_interval=None, open_timeout=60)
    emit("ready")
    serial = 0
    try:
        while True:
            command, _, payload = (await next_command(commands)).partition(" ")
            args: dict[str, Any] = json.loads(payload or "{}")
            serial += 1
            match command:
                case "pair":
                    tokens = int(args["max_tokens"])
                    if args.get("http_first"):
                        http = await http_chat(session, tokens)
                        web = await ws_chat(ws, f"pair-{serial}", tokens)
                    else:
                        web = await ws_chat(ws, f"pair-{serial}", tokens)
                        http = await http_chat(session, tokens)
                    emit("pair", {"ws": web, "http": http})
                case "load":
                    emit("load", await _load(args, ws_port, session, serial))
                case "disconnect":
                    emit("stopped", await stop_once(http_port, int(args["wait_chunks"])))
                case _:
                    break
    finally:
        await ws.close()
        await session.close()
    emit("result")


async def _load(args: dict[str, Any], ws_port: int, session: aiohttp.ClientSession, serial: int) -> dict[str, Any]:
    streams, tokens = int(args["streams"]), int(args["max_tokens"])
    sockets: list[ClientConnection] = []
    if args["edge"] == "ws":
        sockets = list(await asyncio.gather(*(
            connect(f"ws://127.0.0.1:{ws_port}/ws", compression=None, ping_interval=None) for _ in range(streams))))
    started = time.perf_counter()
    try:
        if args["edge"] == "ws":
            records = await asyncio.gather(*(ws_chat(s, f"load-{serial}-{i}", tokens) for i, s in enumerate(sockets)))
        else:
            records = await asyncio.gather(*(http_chat(session, tokens) for _ in range(streams)))
    finally:
        await asyncio.gather(*(s.close() for s in sockets))
    wall = time.perf_counter() - started
    return {"wall_s": wall, "tokens": sum(r["tokens"] for r in records), "first_s": [r["first_s"] for r in records],
            "end_s": [r["end_s"] for r in records]}
