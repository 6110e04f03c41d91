"""Every message of PROTOCOL.md as a tagged msgspec Struct.

Client messages forbid unknown fields (PROTOCOL.md answers them with `bad_request`); server
messages omit optional fields that are unset. New fields get defaults and go last.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

import msgspec

# `\Z`, not `$`: Python's `$` also matches before a final newline ("s1\n" is no session id).
SESSION_ID_PATTERN = r"^[A-Za-z0-9_.:\-]{1,128}\Z"
USER_PATTERN = r"^[A-Za-z0-9_.@\-]{1,64}\Z"
USER_RE = re.compile(USER_PATTERN)

SessionId = Annotated[str, msgspec.Meta(pattern=SESSION_ID_PATTERN)]
UserName = Annotated[str, msgspec.Meta(pattern=USER_PATTERN)]
MessageId = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
RequestId = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
Text = Annotated[str, msgspec.Meta(min_length=1)]
Seq = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
"""Bounded so that `seq + 1` stays a valid Redis stream id (msgspec decodes big integers)."""
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]


class _Client(msgspec.Struct, tag_field="type", forbid_unknown_fields=True, omit_defaults=True):
    pass


class Auth(_Client, tag="auth"):
    token: str | None = None
    user: UserName | None = None


class Chat(_Client, tag="chat"):
    session_id: SessionId
    text: Text
    request_id: RequestId | None = None
    max_tokens: PositiveInt | None = None
    temperature: float | None = None
    """0-2; 0 = greedy (the same text every time). Range checked in `protocol.validation`."""
    seed: int | None = None
    """Any signed 64-bit integer, for reproducible sampling."""


class Cancel(_Client, tag="cancel"):
    message_id: MessageId | None = None
    session_id: SessionId | None = None


class Resume(_Client, tag="resume"):
    message_id: MessageId
    after_seq: Seq


class Heartbeat(_Client, tag="heartbeat"):
    ts: float | None = None


class History(_Client, tag="history"):
    session_id: SessionId


class ClearHistory(_Client, tag="clear_history"):
    session_id: SessionId


ClientMessage = Auth | Chat | Cancel | Resume | Heartbeat | History | ClearHistory


class _Server(msgspec.Struct, tag_field="type", omit_defaults=True):
    pass


class AuthOk(_Server, tag="auth_ok"):
    user: str
    expires_at: int | None = None
    """The token's expiry, Unix seconds (absent in development mode)."""


class Accepted(_Server, tag="accepted"):
    session_id: str
    message_id: str
    request_id: str | None = None


class Chunk(_Server, tag="chunk"):
    message_id: str
    seq: int
    text: str


FinishReason = Literal["stop", "length"]


class Done(_Server, tag="done"):
    message_id: str
    seq: int
    finish_reason: FinishReason


class Cancelled(_Server, tag="cancelled"):
    message_id: str
    seq: int


ErrorCode = Literal[
    "bad_request",
    "unauthorized",
    "not_found",
    "rate_limited",
    "overloaded",
    "unavailable",
    "worker_lost",
    "internal",
]


class Error(_Server, tag="error"):
    code: ErrorCode
    message: str
    request_id: str | None = None
    message_id: str | None = None
    seq: int | None = None
    """Extension: for a terminal error, the last chunk's seq (like `done`)."""
    retry_after_ms: int | None = None
    """With `rate_limited`: how long to wait before trying again."""


CancelStatus = Literal["cancelling", "already_cancelled", "already_completed", "not_found"]


class CancelResult(_Server, tag="cancel_result"):
    status: CancelStatus
    message_id: str | None = None
    session_id: str | None = None


class HeartbeatAck(_Server, tag="heartbeat_ack"):
    server_ts: float
    ts: float | None = None


TurnStatus = Literal["complete", "cancelled", "error", "streaming"]


class HistoryTurn(msgspec.Struct):
    message_id: str
    role: Literal["user", "assistant"]
    text: str
    status: TurnStatus


class HistoryReply(_Server, tag="history"):
    session_id: str
    turns: list[HistoryTurn]


class HistoryCleared(_Server, tag="history_cleared"):
    session_id: str


ServerMessage = (
    AuthOk
    | Accepted
    | Chunk
    | Done
    | Cancelled
    | Error
    | CancelResult
    | HeartbeatAck
    | HistoryReply
    | HistoryCleared
)
Terminal = Done | Cancelled | Error
TerminalState = Literal["done", "cancelled", "error"]


def state_of(terminal: Terminal) -> TerminalState:
    """The state a message is left in by its terminal event."""
    match terminal:
        case Done():
            return "done"
        case Cancelled():
            return "cancelled"
    return "error"

encoder = msgspec.json.Encoder()
server_decoder: msgspec.json.Decoder[ServerMessage] = msgspec.json.Decoder(ServerMessage)


def encode(message: ServerMessage | ClientMessage) -> bytes:
    return encoder.encode(message)


def encode_text(message: ServerMessage | ClientMessage) -> str:
    """Frames are text frames: websockets sends `str` as a text frame."""
    return encoder.encode(message).decode()
