"""Gateway ↔ worker records. Unknown fields are tolerated so that a rolling deploy works."""

from __future__ import annotations

from typing import Literal

import msgspec

Role = Literal["system", "user", "assistant"]


class ChatTurn(msgspec.Struct, frozen=True):
    """One message of a conversation that a client sends whole (the OpenAI-compatible edge)."""

    role: Role
    content: str


class Job(msgspec.Struct, frozen=True):
    """One generation request, as queued on the jobs stream."""

    message_id: str
    user: str
    session_id: str
    text: str
    max_tokens: int
    request_id: str | None = None
    created_ms: int = 0
    temperature: float | None = None
    """None: the worker's default."""
    seed: int | None = None
    """None: the worker's default."""
    conversation: tuple[ChatTurn, ...] | None = None
    """The turns before `text` (the last user turn), oldest first, when the client sends the
    whole conversation (the OpenAI-compatible edge): the worker prompts with them instead of
    the session's history. None: the session's history."""


class StoredTurn(msgspec.Struct, frozen=True):
    """A user turn in a session's history list."""

    message_id: str
    text: str


class StoredAnswer(msgspec.Struct, frozen=True):
    """An assistant turn, written when its message ends."""

    text: str
    status: str


job_encoder = msgspec.json.Encoder()
job_decoder = msgspec.json.Decoder(Job)
turn_decoder = msgspec.json.Decoder(StoredTurn)
answer_decoder = msgspec.json.Decoder(StoredAnswer)
