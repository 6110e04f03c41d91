"""What every benchmark client process shares: the frame fields they read, and the line
protocol with the benchmark (`TAG {json}` lines out on stdout, commands in on stdin)."""

from __future__ import annotations

import asyncio
import json
import resource
import sys
from typing import Any

import msgspec

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


