"""Join tokens that arrive less than `window_s` apart into one chunk (pure; caller's clock).

The first token after a quiet spell goes out at once; tokens that follow within `window_s` of
the last chunk wait and leave together when the window ends (the caller arms a timer for
`deadline()`). A slow engine thus gets one chunk per token and no added delay; a fast one
gets at most one chunk per window per message, which bounds Redis writes and frames.
"""

from __future__ import annotations

from dataclasses import dataclass, field

WINDOW_S = 0.016
"""Default window: one frame of a 60 Hz display, so a reader sees no difference from
token-by-token streaming. Each chunk costs a Redis write, a publish and a frame through every
hop, and on a fast engine that work slows the model itself (the worker's event loop shares the
GIL with the generation thread; docs/PERFORMANCE.md, `python -m bench relay_overhead`)."""


@dataclass(slots=True)
class Coalescer:
    window_s: float = WINDOW_S
    max_chars: int = 4_096
    _parts: list[str] = field(default_factory=list)
    _chars: int = 0
    _last_sent: float = float("-inf")

    def deadline(self) -> float | None:
        """When the held tokens are due, or None if nothing is held."""
        return self._last_sent + self.window_s if self._parts else None

    def add(self, text: str, now: float) -> str | None:
        """Hold a token; returns a chunk if one should be sent now."""
        if text:
            self._parts.append(text)
            self._chars += len(text)
        return self.due(now)

    def due(self, now: float) -> str | None:
        if self._parts and (now - self._last_sent >= self.window_s or self._chars >= self.max_chars):
            return self.take(now)
        return None

    def take(self, now: float) -> str | None:
        """Everything held, as one chunk, regardless of the window (used at the end)."""
        if not self._parts:
            return None
        chunk = "".join(self._parts)
        self._parts.clear()
        self._chars = 0
        self._last_sent = now
        return chunk
