"""A thread-safe cancellation token, one per job.

asyncio sets it (a cancel pushed over pub/sub, an orphaned stream, shutdown); the generation
thread reads `cancelled` after every token from local memory, so the token loop never calls
Redis. Callbacks run outside the lock, so a callback may touch the token again without
deadlocking.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable


class Phase(enum.Enum):
    QUEUED = "queued"
    PROMPT = "prompt"
    GENERATING = "generating"
    FINISHED = "finished"


class CancelToken:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cancelled = False
        self._reason = ""
        self._cancelled_at: float | None = None
        self._phase = Phase.QUEUED
        self._phase_at_cancel: Phase | None = None
        self._callbacks: list[Callable[[CancelToken], None]] = []

    @property
    def cancelled(self) -> bool:
        """Lock-free read: a single attribute load is atomic under the GIL."""
        return self._cancelled

    @property
    def reason(self) -> str:
        return self._reason

    @property
    def cancelled_at(self) -> float | None:
        """`time.monotonic()` when `cancel` first took effect."""
        return self._cancelled_at

    @property
    def phase(self) -> Phase:
        return self._phase

    @property
    def phase_at_cancel(self) -> Phase | None:
        return self._phase_at_cancel

    def set_phase(self, phase: Phase) -> None:
        with self._lock:
            self._phase = phase

    def cancel(self, reason: str = "cancel") -> bool:
        """Cancel once; returns False if it was already cancelled."""
        with self._lock:
            if self._cancelled:
                return False
            self._cancelled = True
            self._reason = reason
            self._cancelled_at = time.monotonic()
            self._phase_at_cancel = self._phase
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback(self)
        return True

    def add_callback(self, callback: Callable[[CancelToken], None]) -> None:
        """Run `callback(token)` on cancel; at once if already cancelled."""
        with self._lock:
            if not self._cancelled:
                self._callbacks.append(callback)
                return
        callback(self)
