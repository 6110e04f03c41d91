"""Every message of PROTOCOL.md, and every kind of malformed input, with no network."""

from __future__ import annotations

import json

import pytest

from protocol.errors import BadRequest
from protocol.messages import (
    Accepted,
    Auth,
    AuthOk,
    Cancel,
    CancelResult,
    Cancelled,
    Chat,
    Chunk,
    ClearHistory,
    Done,
    Error,
    Heartbeat,
    HeartbeatAck,
    History,
    HistoryCleared,
    HistoryReply,
    HistoryTurn,
    Resume,
    encode_text,
    server_decoder,
)
from protocol.validation import Limits, decode_client

CLIENT_CASES = [
    ({"type": "auth", "user": "alice"}, Auth(user="alice")),
    ({"type": "auth", "token": "abc.def"}, Auth(token="abc.def")),
    ({"type": "chat", "session_id": "s-1.a:b_c", "text": "hi"}, Chat(session_id="s-1.a:b_c", text="hi")),
    (
        {"type": "chat", "session_id": "s", "text": "hi", "request_id": "r", "max_tokens": 7},
        Chat(session_id="s", text="hi", request_id="r", max_tokens=7),
    ),
    (
        {"type": "chat", "session_id": "s", "text": "hi", "temperature": 0, "seed": -(2**63)},
        Chat(session_id="s", text="hi", temperature=0.0, seed=-(2**63)),
    ),
    (
        {"type": "chat", "session_id": "s", "text": "hi", "temperature": 2, "seed": 2**63 - 1},
        Chat(session_id="s", text="hi", temperature=2.0, seed=2**63 - 1),
    ),
    ({"type": "cancel", "message_id": "m1"}, Cancel(message_id="m1")),
    ({"type": "cancel", "session_id": "s"}, Cancel(session_id="s")),
    ({"type": "cancel", "message_id": "m1", "session_id": "s"}, Cancel(message_id="m1", session_id="s")),
    ({"type": "resume", "message_id": "m1", "after_seq": 0}, Resume(message_id="m1", after_seq=0)),
    ({"type": "heartbeat"}, Heartbeat()),
    ({"type": "heartbeat", "ts": 12.5}, Heartbeat(ts=12.5)),
    ({"type": "history", "session_id": "s"}, History(session_id="s")),
    ({"type": "clear_history", "session_id": "s"}, ClearHistory(session_id="s")),
]


@pytest.mark.parametrize(("raw", "expected"), CLIENT_CASES)
def test_every_client_message_decodes(raw: dict[str, object], expected: object) -> None:
    assert decode_client(json.dumps(raw)) == expected


BAD = [
    ("not json", "malformed JSON"),
    ("42", "JSON object"),
    ('{"session_id": "s"}', "type"),
    ('{"type": "dance"}', "type"),
    ('{"type": 5}', "type"),
    ('{"type": "chat", "text": "x"}', "session_id"),
    ('{"type": "chat", "session_id": "s"}', "text"),
    ('{"type": "chat", "session_id": "s", "text": ""}', "text"),
    ('{"type": "chat", "session_id": "", "text": "x"}', "session_id"),
    ('{"type": "chat", "session_id": "' + "a" * 129 + '", "text": "x"}', "session_id"),
    ('{"type": "chat", "session_id": "a b", "text": "x"}', "session_id"),
    ('{"type": "chat", "session_id": "s", "text": "x", "max_tokens": 0}', "max_tokens"),
    ('{"type": "chat", "session_id": "s", "text": "x", "max_tokens": "3"}', "max_tokens"),
    ('{"type": "chat", "session_id": "s", "text": "x", "extra": 1}', "extra"),
    ('{"type": "chat", "session_id": "s", "text": "x", "temperature": 2.01}', "temperature must be between 0 and 2"),
    ('{"type": "chat", "session_id": "s", "text": "x", "temperature": -0.5}', "temperature must be between 0 and 2"),
    ('{"type": "chat", "session_id": "s", "text": "x", "temperature": "warm"}', "temperature"),
    ('{"type": "chat", "session_id": "s", "text": "x", "seed": 1.5}', "seed"),
    ('{"type": "chat", "session_id": "s", "text": "x", "seed": true}', "seed"),
    ('{"type": "chat", "session_id": "s", "text": "x", "seed": 9223372036854775808}', "seed must be a signed 64-bit"),
    ('{"type": "resume", "message_id": "m"}', "after_seq"),
    ('{"type": "resume", "message_id": "m", "after_seq": -1}', "after_seq"),
    ('{"type": "resume", "message_id": "m", "after_seq": 1.5}', "after_seq"),
    ('{"type": "auth", "user": "a:b"}', "user"),
    ('{"type": "history"}', "session_id"),
    ('{"type": "heartbeat", "ts": "now"}', "ts"),
]


@pytest.mark.parametrize(("frame", "mentions"), BAD)
def test_malformed_input_raises_bad_request_naming_the_problem(frame: str, mentions: str) -> None:
    with pytest.raises(BadRequest) as info:
        decode_client(frame)
    assert info.value.code == "bad_request"
    assert mentions in str(info.value)


def test_binary_frames_are_refused() -> None:
    with pytest.raises(BadRequest, match="binary"):
        decode_client(b'{"type": "heartbeat"}')


def test_limits_on_text_and_max_tokens_echo_request_id() -> None:
    limits = Limits(max_text_chars=5, max_tokens=10)
    with pytest.raises(BadRequest, match="too long") as info:
        decode_client('{"type":"chat","session_id":"s","text":"123456","request_id":"r9"}', limits)
    assert info.value.request_id == "r9"
    with pytest.raises(BadRequest, match="between 1 and 10"):
        decode_client('{"type":"chat","session_id":"s","text":"1","max_tokens":11}', limits)
    assert decode_client('{"type":"chat","session_id":"s","text":"12345","max_tokens":10}', limits)


def test_sampling_range_errors_echo_request_id() -> None:
    for field in ('"temperature": 3', '"seed": -9223372036854775809'):
        with pytest.raises(BadRequest) as info:
            decode_client('{"type":"chat","session_id":"s","text":"x","request_id":"r2",' + field + "}")
        assert info.value.request_id == "r2"


def test_request_id_is_echoed_on_validation_errors() -> None:
    with pytest.raises(BadRequest) as info:
        decode_client('{"type":"chat","session_id":"bad id","text":"x","request_id":"r1"}')
    assert info.value.request_id == "r1"


SERVER_CASES = [
    (AuthOk(user="alice"), {"type": "auth_ok", "user": "alice"}),
    (
        Accepted(session_id="s", message_id="m", request_id="r"),
        {"type": "accepted", "session_id": "s", "message_id": "m", "request_id": "r"},
    ),
    (Chunk(message_id="m", seq=1, text="hi"), {"type": "chunk", "message_id": "m", "seq": 1, "text": "hi"}),
    (
        Done(message_id="m", seq=3, finish_reason="stop"),
        {"type": "done", "message_id": "m", "seq": 3, "finish_reason": "stop"},
    ),
    (Cancelled(message_id="m", seq=0), {"type": "cancelled", "message_id": "m", "seq": 0}),
    (Error(code="not_found", message="gone"), {"type": "error", "code": "not_found", "message": "gone"}),
    (
        Error(code="worker_lost", message="x", message_id="m", seq=2),
        {"type": "error", "code": "worker_lost", "message": "x", "message_id": "m", "seq": 2},
    ),
    (
        CancelResult(status="already_completed", message_id="m"),
        {"type": "cancel_result", "status": "already_completed", "message_id": "m"},
    ),
    (HeartbeatAck(server_ts=1.0, ts=2.0), {"type": "heartbeat_ack", "server_ts": 1.0, "ts": 2.0}),
    (
        HistoryReply(session_id="s", turns=[HistoryTurn("m", "user", "q", "complete")]),
        {
            "type": "history",
            "session_id": "s",
            "turns": [{"message_id": "m", "role": "user", "text": "q", "status": "complete"}],
        },
    ),
    (HistoryCleared(session_id="s"), {"type": "history_cleared", "session_id": "s"}),
]


@pytest.mark.parametrize(("message", "wire"), SERVER_CASES)
def test_every_server_message_encodes_as_protocol_md_says(message: object, wire: dict[str, object]) -> None:
    text = encode_text(message)  # type: ignore[arg-type]
    assert json.loads(text) == wire
    assert server_decoder.decode(text) == message


def test_client_messages_leave_unset_optional_fields_out() -> None:
    assert json.loads(encode_text(Cancel(session_id="s"))) == {"type": "cancel", "session_id": "s"}
    assert json.loads(encode_text(Chat(session_id="s", text="t"))) == {"type": "chat", "session_id": "s", "text": "t"}
