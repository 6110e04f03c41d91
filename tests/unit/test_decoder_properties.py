"""Property tests of the client-message decoder (hypothesis): whatever a client sends, the
answer is a valid message or a `BadRequest`, never another exception; valid messages come
back unchanged; what passes respects every bound of PROTOCOL.md."""

from __future__ import annotations

import json
import math
import random
import re
from typing import Any

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import BadRequest
from protocol.messages import (
    SESSION_ID_PATTERN,
    USER_RE,
    Auth,
    Cancel,
    Chat,
    ClearHistory,
    ClientMessage,
    Heartbeat,
    History,
    Resume,
    encode_text,
)
from protocol.validation import decode_client
from tests.fuzzing import FIELDS, LIMITS, hostile, json_values, message_like, mutate, valid_messages

SESSION_ID_RE = re.compile(SESSION_ID_PATTERN)

VALID = valid_messages()


def check(frame: str | bytes) -> ClientMessage | BadRequest:
    """Decode; anything but a message or `BadRequest` fails the test (it propagates)."""
    try:
        message = decode_client(frame, LIMITS)
    except BadRequest as exc:
        assert str(exc), "a BadRequest says what is wrong"
        assert exc.request_id is None or isinstance(exc.request_id, str)
        return exc
    assert_within_bounds(message)
    return message


def assert_within_bounds(message: ClientMessage) -> None:
    match message:
        case Chat(session_id=sid, text=text, max_tokens=n, request_id=rid):
            assert SESSION_ID_RE.fullmatch(sid) and 1 <= len(text) <= LIMITS.max_text_chars
            assert n is None or 1 <= n <= LIMITS.max_tokens
            assert rid is None or 1 <= len(rid) <= 128
        case Cancel(message_id=mid, session_id=sid):
            assert mid is None or 1 <= len(mid) <= 64
            assert sid is None or SESSION_ID_RE.fullmatch(sid)
        case Resume(message_id=mid, after_seq=seq):
            assert 1 <= len(mid) <= 64 and seq >= 0
        case Heartbeat(ts=ts):
            assert ts is None or math.isfinite(ts)
        case History(session_id=sid) | ClearHistory(session_id=sid):
            assert SESSION_ID_RE.fullmatch(sid)
        case Auth(user=user):
            assert user is None or USER_RE.fullmatch(user)


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=300))
def test_any_text_is_a_message_or_bad_request(frame: str) -> None:
    check(frame)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_binary_frames_are_bad_request(frame: bytes) -> None:
    assert isinstance(check(frame), BadRequest)


@settings(max_examples=300, deadline=None)
@given(message_like())
def test_any_json_object_is_a_message_or_bad_request(obj: dict[str, Any]) -> None:
    check(json.dumps(obj, allow_nan=True))


@settings(max_examples=500, deadline=None)
@given(VALID)
def test_valid_messages_come_back_unchanged(message: ClientMessage) -> None:
    decoded = check(encode_text(message))
    assert decoded == message


@settings(max_examples=300, deadline=None)
@given(VALID, st.text(min_size=1, max_size=10), json_values)
def test_an_unknown_field_is_bad_request(message: ClientMessage, name: str, value: Any) -> None:
    obj = msgspec.json.decode(encode_text(message))
    if name in obj or name in FIELDS:
        return
    obj[name] = value
    assert isinstance(check(json.dumps(obj)), BadRequest)


@settings(max_examples=300, deadline=None)
@given(VALID, st.integers(0, 2**32))
def test_mutated_frames_are_a_message_or_bad_request(message: ClientMessage, seed: int) -> None:
    frame = mutate(encode_text(message).encode(), random.Random(seed))
    check(frame.decode("utf-8", errors="replace"))  # a WebSocket text frame is valid UTF-8


@given(st.integers(1, 200_000), st.sampled_from(["[", "{\"a\":", "{\"type\":\"chat\",\"x\":["]))
@settings(max_examples=30, deadline=None)
def test_deep_nesting_is_bad_request(depth: int, opener: str) -> None:
    assert isinstance(check(opener * depth), BadRequest)


def test_huge_numbers_nan_and_lone_surrogates_are_bad_request() -> None:
    for frame in (
        '{"type":"chat","session_id":"s","text":"x","max_tokens":' + "9" * 5000 + "}",
        '{"type":"heartbeat","ts":1e999}',
        '{"type":"heartbeat","ts":NaN}',
        '{"type":"resume","message_id":"m","after_seq":' + "9" * 30 + "}",
        '{"type":"chat","session_id":"s","text":"\\ud800"}',
        '{"type":"chat","session_id":"s\\n","text":"x"}',
        '{"type":"auth","user":"alice\\n"}',
    ):
        assert isinstance(check(frame), BadRequest), frame


def test_hostile_shapes_are_bad_request_or_a_harmless_message() -> None:
    rng = random.Random(15)
    results = [check(hostile(rng, 64 * 1024)) for _ in range(300)]
    harmless = [r for r in results if not isinstance(r, BadRequest)]
    assert all(r == Chat(session_id="s", text="\x00") or r == Heartbeat(ts=0.0) for r in harmless), harmless
    assert len(harmless) < len(results) / 5
