"""What one generation has done so far, and how it ends: pure state, no I/O.

The job (`worker.job`) feeds it chunk writes and their outcomes; it says when to stop and which
terminal event ends the message. The store is the authority on what the client saw: the text
saved as the answer is that of the chunks the store accepted, in order.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from protocol.messages import Cancelled, Done, Error, ErrorCode, FinishReason, Terminal

if TYPE_CHECKING:
    from store.redis_store import Append

SHUTDOWN = "shutdown"
"""Cancel reason of a draining worker that ran out of time: not the user's Stop."""
UNAVAILABLE = "unavailable"
"""Cancel reason of a job whose chunk writes Redis refused until their deadline."""
FENCED = "fenced"
"""Cancel reason of a job another worker owns now."""


class Stop(enum.Enum):
    """What a chunk write's outcome asks of the generation: go on, or stop with this cancel
    reason (`cancel`: the store ended the message, a user's Stop)."""

    GO_ON = ""
    CANCELLED = "cancel"
    FENCED = FENCED
    UNAVAILABLE = UNAVAILABLE


@dataclass(slots=True)
class Progress:
    start_seq: int = 0
    seq: int = 0
    """The last seq handed out."""
    stored_seq: int = 0
    """The highest seq the store accepted."""
    chunks: list[str] = field(default_factory=list)
    """Text of each chunk, seq `start_seq + 1` onwards."""
    writing: int = 0
    """Chunk writes not answered yet."""
    lost: bool = False
    """A write was refused because another worker owns the job now."""
    failed: bool = False
    """Redis refused a write until its deadline: no more chunks, the message ends `error`."""

    def __post_init__(self) -> None:
        self.seq = self.stored_seq = self.start_seq

    def next_chunk(self, text: str) -> int | None:
        """The seq of a new chunk, or None when no more chunks may be written."""
        if self.lost or self.failed:
            return None
        self.seq += 1
        self.chunks.append(text)
        self.writing += 1
        return self.seq

    def written(self, seq: int, outcome: Append | BaseException) -> Stop:
        """Record a write's outcome; what the generation must do about it."""
        self.writing -= 1
        match outcome:
            case "written":
                self.stored_seq = max(self.stored_seq, seq)
                return Stop.GO_ON
            case "cancelled":
                return Stop.CANCELLED
            case "not_ours":
                self.lost = True
                return Stop.FENCED
            case _:
                self.failed = True
                return Stop.UNAVAILABLE

    def text_of(self, seq: int) -> str | None:
        """The text of chunk `seq` of this generation, or None for one it did not write."""
        if self.start_seq < seq <= self.seq:
            return self.chunks[seq - self.start_seq - 1]
        return None

    @property
    def answer(self) -> str:
        """The text of the chunks the store accepted."""
        return "".join(self.chunks[: self.stored_seq - self.start_seq])


def terminal_event(
    message_id: str,
    *,
    failure: tuple[ErrorCode, str] | None,
    cancel_reason: str,
    finish: FinishReason | None,
) -> Terminal:
    """The event that ends a generation. Its `seq` is a placeholder: the store puts the
    terminal right after the last chunk it accepted."""
    if failure is not None:
        code, why = failure
        return Error(code=code, message=why, message_id=message_id, seq=0)
    if cancel_reason == UNAVAILABLE:
        why = "the message store refused writes for too long"
        return Error(code="unavailable", message=why, message_id=message_id, seq=0)
    if cancel_reason == SHUTDOWN:
        why = "the worker shut down before the answer was complete"
        return Error(code="worker_lost", message=why, message_id=message_id, seq=0)
    if cancel_reason:
        return Cancelled(message_id=message_id, seq=0)
    if finish is not None:
        return Done(message_id=message_id, seq=0, finish_reason=finish)
    return Error(code="internal", message="engine ended without finishing", message_id=message_id, seq=0)

