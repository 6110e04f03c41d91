"""Frames for fuzzing the client-message decoder and a live gateway: hypothesis strategies
of JSON values, message-like objects and valid messages, byte-level mutations, and the
hostile shapes named in issue 15 (deep nesting, huge numbers, NaN, invalid UTF-8, oversize)."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from protocol.messages import Auth, Cancel, Chat, ClearHistory, ClientMessage, Heartbeat, History, Resume
from protocol.validation import KNOWN_TYPES, Limits

LIMITS = Limits()
FIELDS = ["type", "session_id", "text", "request_id", "max_tokens", "message_id", "after_seq", "ts", "token", "user"]

json_scalars = (
    st.none() | st.booleans() | st.integers() | st.integers(min_value=-(2**200), max_value=2**200)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=50)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)


def message_like(types: tuple[str, ...] = KNOWN_TYPES) -> st.SearchStrategy[dict[str, Any]]:
    """Objects with the protocol's field names (and others) holding any JSON values."""
    return st.fixed_dictionaries(
        {}, optional={name: json_values | st.sampled_from(types + ("fly", "")) for name in FIELDS}
    ) | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), json_values, max_size=6)


session_ids = st.from_regex(r"\A[A-Za-z0-9_.:\-]{1,128}\Z")
user_names = st.from_regex(r"\A[A-Za-z0-9_.@\-]{1,64}\Z")


def valid_messages(with_auth: bool = True) -> st.SearchStrategy[ClientMessage]:
    kinds: list[st.SearchStrategy[Any]] = [
        st.builds(Chat, session_id=session_ids, text=st.text(min_size=1, max_size=200),
                  request_id=st.none() | st.text(min_size=1, max_size=128),
                  max_tokens=st.none() | st.integers(1, LIMITS.max_tokens)),
        st.builds(Cancel, message_id=st.none() | st.text(min_size=1, max_size=64), session_id=st.none() | session_ids),
        st.builds(Resume, message_id=st.text(min_size=1, max_size=64), after_seq=st.integers(0, 2**63 - 1)),
        st.builds(Heartbeat, ts=st.none() | st.floats(allow_nan=False, allow_infinity=False)),
        st.builds(History, session_id=session_ids),
        st.builds(ClearHistory, session_id=session_ids),
    ]
    if with_auth:
        kinds.append(st.builds(Auth, token=st.none() | st.text(max_size=100), user=st.none() | user_names))
    return st.one_of(kinds)


def mutate(frame: bytes, rng: random.Random, edits: int = 3) -> bytes:
    """`frame` with a few random byte edits: flips, cuts, insertions, repeats."""
    out = bytearray(frame)
    for _ in range(rng.randint(1, edits)):
        where = rng.randint(0, len(out))
        match rng.choice(("flip", "cut", "insert", "repeat")):
            case "flip" if where < len(out):
                out[where] ^= rng.randint(1, 255)
            case "cut":
                del out[where:]
            case "insert":
                out[where:where] = rng.randbytes(rng.randint(1, 8))
            case "repeat":
                out[where:where] = out[:where]
    return bytes(out)


def hostile(rng: random.Random, max_frame: int) -> str | bytes:
    """One of the shapes a parser chokes on; `bytes` are meant as a text frame of invalid UTF-8."""
    depth = rng.randint(1_000, max_frame - 100)
    number = "9" * rng.randint(20, 5_000)
    choices: list[Callable[[], str | bytes]] = [
        lambda: "[" * depth,
        lambda: '{"type":"chat","session_id":"s","text":"x","x":' + "[" * depth + "]" * depth + "}",
        lambda: '{"request_id":' + "{\"a\":" * (depth // 5),
        lambda: '{"type":"chat","session_id":"s","text":"x","max_tokens":' + number + "}",
        lambda: '{"type":"resume","message_id":"m","after_seq":' + number + "}",
        lambda: '{"type":"heartbeat","ts":' + rng.choice(["NaN", "Infinity", "-Infinity", "1e999", "-0", number]) + "}",
        lambda: '{"type":"chat","session_id":"s","text":"' + rng.choice(["\\ud800", "\\udfff", "\\u0000"]) + '"}',
        lambda: '{"type":"' + rng.choice(["fly", "", "CHAT", "chat ", "auth\\u0000"]) + '"}',
        lambda: '{"type":"chat","session_id":' + rng.choice(["1", "null", "[]", "{}", "true", '"a b"', '"s\\n"'])
        + ',"text":"x"}',
        lambda: '{"type":"cancel","message_id":' + rng.choice(["1", "[]", '""', '"' + "m" * 65 + '"']) + "}",
        lambda: b'{"type":"chat","session_id":"s","text":"\xff\xfe"}',
        lambda: "x" * rng.randint(max_frame + 1, 2 * max_frame),
        lambda: '{"type":"chat","session_id":"s","text":"' + "y" * (LIMITS.max_text_chars + 1) + '"}',
    ]
    return rng.choice(choices)()


def draw(strategy: st.SearchStrategy[Any], count: int) -> list[Any]:
    """`count` values of a strategy, reproducibly (hypothesis used as a generator: a test
    that only collects cannot fail, so nothing is shrunk)."""
    values: list[Any] = []

    @settings(max_examples=count, database=None, derandomize=True, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(value: Any) -> None:
        values.append(value)

    collect()
    return values


def to_text(obj: dict[str, Any]) -> str:
    return json.dumps(obj, allow_nan=True)
