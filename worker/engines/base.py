"""The interface every engine implements.

An engine turns a `GenerationRequest` into an async stream of text pieces. It must:
- stop within one token once `token.cancelled` is set (the worker then ends the message
  `cancelled`); it returns normally, it does not raise, on cancel;
- end with exactly one `Finish` item when it was not cancelled;
- never block the event loop (CPU-bound work runs in a thread).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal, Protocol

from worker.cancel_token import CancelToken


@dataclass(frozen=True, slots=True)
class Turn:
    role: Literal["user", "assistant"]
    text: str


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    message_id: str
    text: str
    max_tokens: int
    history: list[Turn] = field(default_factory=list)
    """Earlier turns of the session, oldest first (not including `text`)."""
    temperature: float | None = None
    """0: greedy (the same text every time); None: the engine's default."""
    seed: int | None = None
    """Sampling seed; None: the engine's default."""


@dataclass(frozen=True, slots=True)
class Finish:
    reason: Literal["stop", "length"]


class Engine(Protocol):
    name: str
    coalesces: bool
    """True if the engine already joins the pieces of one coalescing window (the job then
    sends each piece as it comes instead of holding it again)."""

    async def start(self) -> None:
        """Load weights and warm up; called once before the first job."""

    async def close(self) -> None:
        """Release threads and memory."""

    def generate(
        self, request: GenerationRequest, token: CancelToken
    ) -> AsyncIterator[str | Finish]:
        """Yield text pieces, then one `Finish` (nothing more after a cancel)."""
        ...
