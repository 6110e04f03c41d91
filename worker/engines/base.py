"""The interface every engine implements.

An engine turns a `GenerationRequest` into an async stream of text pieces. It must:
- stop within one token once `token.cancelled` is set (the worker then ends the message
  `cancelled`); it returns normally, it does not raise, on cancel;
- end with exactly one `Finish` item when it was not cancelled;
- never block the event loop (CPU-bound work runs in a thread);
- raise `worker.PromptTooLong` (before any text) when the request cannot fit its context.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal, Protocol

from worker.cancel_token import CancelToken


DEFAULT_TEMPERATURE = 0.3
"""Low, as SmolLM2's model card suggests (0.2): on four factual questions, 8 answers each at
each temperature, SmolLM2-135M answered 31 of 32 right at 0.3, 27 at 0.8."""


@dataclass(frozen=True, slots=True)
class Turn:
    role: Literal["user", "assistant"]
    text: str
    status: Literal["complete", "cancelled"] = "complete"
    """`cancelled`: an answer the user stopped; `text` is the part that was sent."""


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
    system: str | None = None
    """The client's system prompt, instead of the engine's own; None: the engine's."""


@dataclass(frozen=True, slots=True)
class Finish:
    reason: Literal["stop", "length"]


class Engine(Protocol):
    name: str
    model: str
    """The model's name, registered with the worker (gateways list it at `/info`)."""
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
