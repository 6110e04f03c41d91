"""Turn raw client frames into `ClientMessage`s, or a `BadRequest` a person can act on."""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from protocol.errors import BadRequest
from protocol.messages import Chat, ClientMessage

_decoder: msgspec.json.Decoder[ClientMessage] = msgspec.json.Decoder(ClientMessage)


class _Peek(msgspec.Struct):
    """Lenient view used only to echo `request_id` back on a malformed message."""

    request_id: str | None = None


_peek_decoder = msgspec.json.Decoder(_Peek)
KNOWN_TYPES = ("auth", "chat", "cancel", "resume", "heartbeat", "history", "clear_history")


MIN_TEMPERATURE, MAX_TEMPERATURE = 0.0, 2.0
MIN_SEED, MAX_SEED = -(2**63), 2**63 - 1


@dataclass(frozen=True, slots=True)
class Limits:
    max_text_chars: int = 16_000
    max_tokens: int = 2_048


def _request_id_of(frame: bytes | str) -> str | None:
    try:
        rid = _peek_decoder.decode(frame).request_id
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return None
    return rid if isinstance(rid, str) else None


def decode_client(frame: bytes | str, limits: Limits = Limits()) -> ClientMessage:
    """Decode and validate one text frame. Raises `BadRequest`."""
    if isinstance(frame, bytes):
        raise BadRequest("binary frames are not supported: send JSON as a text frame")
    try:
        message = _decoder.decode(frame)
    except msgspec.ValidationError as exc:
        raise BadRequest(_explain(str(exc)), _request_id_of(frame)) from None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"malformed JSON: {exc}") from None
    except RecursionError:  # msgspec's depth guard, on values nested thousands deep
        raise BadRequest("malformed JSON: nested too deeply") from None
    match message:
        case Chat(text=text) if len(text) > limits.max_text_chars:
            raise BadRequest(
                f"text too long: {len(text)} characters, the limit is {limits.max_text_chars}",
                message.request_id,
            )
        case Chat(max_tokens=int(n)) if n > limits.max_tokens:
            raise BadRequest(
                f"max_tokens must be between 1 and {limits.max_tokens}, got {n}",
                message.request_id,
            )
        case Chat(temperature=float(value)) if not MIN_TEMPERATURE <= value <= MAX_TEMPERATURE:
            raise BadRequest(
                f"temperature must be between {MIN_TEMPERATURE:g} and {MAX_TEMPERATURE:g} (0: greedy), got {value:g}",
                message.request_id,
            )
        case Chat(seed=int(seed)) if not MIN_SEED <= seed <= MAX_SEED:
            raise BadRequest(f"seed must be a signed 64-bit integer, got {seed}", message.request_id)
    return message


def _explain(detail: str) -> str:
    if "`$.type`" in detail or "missing required field `type`" in detail:
        return f"unknown or missing message type ({detail}); expected one of: {', '.join(KNOWN_TYPES)}"
    if detail.startswith("Expected `object`"):
        return "a message must be a JSON object with a \"type\" field"
    return f"invalid message: {detail}"
