"""Protocol checks of the load test, apart from any I/O (feed frames in, read violations out).

What `Checker` enforces, per PROTOCOL.md:
- every accepted message ends in exactly one terminal event (`done`, `cancelled`, or `error`
  with its `message_id`); nothing (no chunk, no second terminal) comes after it;
- chunk `seq` runs 1, 2, 3, ... with no gap and no duplicate, across `resume` seams (a
  resume with `after_seq = N` must continue at N + 1);
- a terminal's `seq` is the last chunk's seq (0 if none; for `error` only when it has one);
- `cancel_result.status` is one of the four statuses, and a cancel of one of our messages
  (which exists: it was accepted) never answers `not_found`;
- a message with no terminal within the timeout (`expire`) is a violation.

Each breach is one human-readable string in `Checker.violations`, and counted by kind in
`Checker.kinds` (`gap`, `duplicate`, `missing_terminal`, `second_terminal`, ...). Events that are legal but
worth a look (a cancel answered `cancelling` whose message then ended `done`: the signal
raced the last token) are counted in `Checker.anomalies`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

TERMINAL_TYPES = frozenset({"done", "cancelled", "error"})
CANCEL_STATUSES = frozenset({"cancelling", "already_cancelled", "already_completed", "not_found"})

Frame = dict[str, Any]


def is_stream_event(frame: Frame) -> bool:
    """A chunk or a terminal of some message (an `error` without message_id is neither)."""
    kind = frame.get("type")
    return (kind == "chunk" or kind in TERMINAL_TYPES) and isinstance(frame.get("message_id"), str)


@dataclass(slots=True)
class MessageTrack:
    message_id: str
    last_seq: int = 0
    chunks: int = 0
    tokens: int = 0
    terminal: str | None = None
    cancel_status: str | None = None
    """The status of our cancel of this message, once its cancel_result came."""


class Checker:
    def __init__(self) -> None:
        self.messages: dict[str, MessageTrack] = {}
        self.violations: list[str] = []
        self.kinds: Counter[str] = Counter()
        self.anomalies: Counter[str] = Counter()
        self.anomaly_ids: dict[str, list[str]] = {}

    def anomaly(self, kind: str, message_id: str) -> None:
        self.anomalies[kind] += 1
        self.anomaly_ids.setdefault(kind, []).append(message_id)

    def violation(self, text: str, kind: str = "other") -> None:
        self.violations.append(text)
        self.kinds[kind] += 1

    # --- message lifecycle --------------------------------------------------------------

    def accepted(self, message_id: str) -> MessageTrack:
        if message_id in self.messages:
            self.violation(f"{message_id}: accepted twice (message ids must be unique)", "accepted_twice")
            return self.messages[message_id]
        track = MessageTrack(message_id)
        self.messages[message_id] = track
        return track

    def feed(self, frame: Frame) -> MessageTrack | None:
        """Check one stream event; returns its message's track (None if not a stream event)."""
        if not is_stream_event(frame):
            return None
        mid: str = frame["message_id"]
        track = self.messages.get(mid)
        if track is None:
            self.violation(f"{mid}: {frame['type']} for a message never accepted on this client", "unknown_message")
            track = self.accepted(mid)
        if frame["type"] == "chunk":
            self._chunk(track, frame)
        else:
            self._terminal(track, frame)
        return track

    def _chunk(self, track: MessageTrack, frame: Frame) -> None:
        seq = frame.get("seq")
        mid = track.message_id
        if track.terminal is not None:
            self.violation(f"{mid}: chunk seq={seq} after terminal {track.terminal}", "after_terminal")
            return
        if not isinstance(seq, int):
            self.violation(f"{mid}: chunk without an integer seq: {frame!r}")
            return
        if seq <= track.last_seq:
            self.violation(f"{mid}: duplicate chunk seq={seq} (last held {track.last_seq})", "duplicate")
            return
        if seq != track.last_seq + 1:
            self.violation(f"{mid}: gap: chunk seq={seq} after seq={track.last_seq}", "gap")
        track.last_seq = seq
        track.chunks += 1
        text = frame.get("text")
        track.tokens += len(text.split()) if isinstance(text, str) else 0

    def _terminal(self, track: MessageTrack, frame: Frame) -> None:
        kind, seq, mid = frame["type"], frame.get("seq"), track.message_id
        if track.terminal is not None:
            self.violation(f"{mid}: terminal {kind} (seq={seq}) after terminal {track.terminal}", "second_terminal")
            return
        track.terminal = kind
        if kind == "error" and seq is None:
            return
        if seq != track.last_seq:
            self.violation(f"{mid}: terminal {kind} seq={seq} but the last chunk held is seq={track.last_seq}",
                           "terminal_seq")
        if kind == "done" and track.cancel_status == "cancelling":
            self.anomaly("cancelling_then_done", mid)

    def resumed(self, message_id: str, after_seq: int) -> None:
        """We re-attached with `after_seq`; the next chunk must be `after_seq + 1`."""
        track = self.messages[message_id]
        if after_seq != track.last_seq:  # a bug of the load test itself, not of the server
            raise AssertionError(f"resume after_seq={after_seq} but last held seq={track.last_seq}")

    def expire(self, message_id: str, why: str) -> None:
        track = self.messages.get(message_id)
        if track is not None and track.terminal is None:
            self.violation(f"{message_id}: no terminal event ({why}); last chunk held seq={track.last_seq}",
                           "missing_terminal")
            track.terminal = "missing"

    # --- cancels ------------------------------------------------------------------------

    def cancel_result(self, frame: Frame, target: str | None) -> None:
        """`target`: the message id this cancel was meant for, when we know it."""
        status = frame.get("status")
        mid = frame.get("message_id") if isinstance(frame.get("message_id"), str) else target
        if status not in CANCEL_STATUSES:
            self.violation(f"{mid}: cancel_result with unknown status {status!r}", "cancel_status")
            return
        track = self.messages.get(mid) if mid is not None else None
        if track is None:
            return
        if status == "not_found":
            self.violation(f"{mid}: cancel of our accepted message answered not_found", "cancel_status")
        track.cancel_status = str(status)
        if status == "cancelling" and track.terminal == "done":
            self.anomaly("cancelling_then_done", track.message_id)


def check_stream(frames: list[Frame], message_id: str | None = None) -> list[str]:
    """Violations of one crafted sequence of frames (for tests): `accepted` frames start
    messages, `resume` pseudo-frames (`{"type": "resume", "message_id", "after_seq"}`)
    mark seams, stream events are checked, and a message left open at the end is missing
    its terminal."""
    checker = Checker()
    if message_id is not None:
        checker.accepted(message_id)
    for frame in frames:
        match frame.get("type"):
            case "accepted":
                checker.accepted(frame["message_id"])
            case "resume":
                checker.resumed(frame["message_id"], frame["after_seq"])
            case "cancel_result":
                checker.cancel_result(frame, frame.get("message_id"))
            case _:
                checker.feed(frame)
    for mid in list(checker.messages):
        checker.expire(mid, "end of the sequence")
    return checker.violations
