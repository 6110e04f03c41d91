"""Retrying Redis work: one backoff policy, one classification of errors, one retry loop.

Redis answers errors while it is up (OOM at maxmemory, READONLY after a failover, BUSY from a
slow script, LOADING while an AOF loads, MISCONF after a failed save, NOSCRIPT after a restart)
as well as dropping connections. All of them pass: work that must land is retried with capped
backoff (redis-py's `EqualJitterBackoff`), up to a deadline where the caller gives one.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import redis.exceptions
import structlog
from redis.backoff import EqualJitterBackoff

from store import DeadlinePassed, Unavailable

log = structlog.get_logger("store.retry")

T = TypeVar("T")

REDIS_ERRORS = (redis.exceptions.RedisError, OSError, Unavailable)
"""Everything Redis (or the way to it) can throw at a caller: connection loss, timeouts and
error replies alike."""

CONNECTION_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)
_BUSY_CLASSES = (
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.BusyLoadingError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.MasterDownError,
)
_BUSY_CODES = re.compile(r"(?:^|: -)(OOM|READONLY|BUSY|LOADING|MISCONF|TRYAGAIN|CLUSTERDOWN|MASTERDOWN|NOREPLICAS)\b")
"""Error codes of a Redis that is up but cannot take the command now, at the start of a reply
or, inside a script's error (Redis 6.2 wraps them), after ': -'."""


def is_unavailable(exc: BaseException) -> bool:
    """True for a Redis that cannot be reached, or cannot take commands now (for a client
    the same thing: `unavailable`, try again shortly); False for other errors (a bug)."""
    if isinstance(exc, (*CONNECTION_ERRORS, *_BUSY_CLASSES, Unavailable)):
        return True
    return isinstance(exc, redis.exceptions.ResponseError) and _BUSY_CODES.search(str(exc)) is not None


class Backoff:
    """Capped exponential backoff with jitter; `reset` after a success."""

    def __init__(self, base_s: float = 0.05, cap_s: float = 1.0) -> None:
        self._policy = EqualJitterBackoff(cap=cap_s, base=base_s)
        self.failures = 0

    def reset(self) -> None:
        self.failures = 0

    def next_delay(self) -> float:
        self.failures += 1
        return float(self._policy.compute(self.failures))

    async def wait(self) -> float:
        """Sleep for the next delay; returns it (for the caller's log line)."""
        delay = self.next_delay()
        await asyncio.sleep(delay)
        return delay


async def retry(
    op: Callable[[], Awaitable[T]],
    what: str,
    *,
    deadline_s: float | None = None,
    backoff: Backoff | None = None,
) -> T:
    """Run `op` until it succeeds, retrying any Redis error with backoff. With `deadline_s`,
    give up after that many seconds with `DeadlinePassed` (the last error chained)."""
    backoff = backoff or Backoff()
    give_up = None if deadline_s is None else time.monotonic() + deadline_s
    while True:
        try:
            return await op()
        except REDIS_ERRORS as exc:
            if give_up is not None and time.monotonic() >= give_up:
                raise DeadlinePassed(f"{what}: redis refused it until the deadline: {exc}") from exc
            delay = backoff.next_delay()
            log.warning("redis_retry", op=what, error=str(exc), backoff_s=round(delay, 3))
            await asyncio.sleep(delay)
