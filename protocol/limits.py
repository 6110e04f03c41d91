"""Per-connection limits of PROTOCOL.md's "Security and limits", as pure state machines.

The caller passes the clock (monotonic seconds). Every limit is a setting in `Quotas`; 0
means unlimited (for benchmarks that measure what the checks cost).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Literal

from protocol.messages import Auth, Cancel, ClientMessage, Heartbeat

Bucket = Literal["requests", "control"]


@dataclass(frozen=True, slots=True)
class Quotas:
    request_rate: float = 10.0
    """`chat`, `resume`, `history`, `clear_history` per second and connection."""
    request_burst: int = 30
    control_rate: float = 50.0
    """`cancel` and `heartbeat` per second and connection: their own bucket, so a Stop is
    never refused because of other traffic."""
    control_burst: int = 100
    generations_per_user: int = 8
    """Queued plus running generations of one user, across all gateways."""
    connections_per_user: int = 64
    """Open connections of one user, across all gateways."""
    bad_requests: int = 50
    """`bad_request` errors within `bad_request_window_s` that close a connection (1008)."""
    bad_request_window_s: float = 60.0

    def __post_init__(self) -> None:
        for name in ("request_rate", "request_burst", "control_rate", "control_burst", "generations_per_user",
                     "connections_per_user", "bad_requests", "bad_request_window_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 (unlimited) or more")
        if (self.request_rate and self.request_burst < 1) or (self.control_rate and self.control_burst < 1):
            raise ValueError("a rate limit needs a burst of at least 1")


UNLIMITED = Quotas(
    request_rate=0, request_burst=0, control_rate=0, control_burst=0,
    generations_per_user=0, connections_per_user=0, bad_requests=0,
)
"""Every limit off (benchmarks only)."""


def bucket_of(message: ClientMessage) -> Bucket | None:
    """Which token bucket a message draws from (None: `auth`, which no bucket limits)."""
    match message:
        case Cancel() | Heartbeat():
            return "control"
        case Auth():
            return None
        case _:
            return "requests"


class TokenBucket:
    """`rate` tokens a second up to `burst`; starts full. Rate 0: unlimited."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = now

    def take(self, now: float) -> float:
        """Take one token: 0.0 when granted, else the seconds until one is there (nothing
        is taken then)."""
        if self.rate <= 0:
            return 0.0
        tokens = min(self.burst, self.tokens + max(0.0, now - self.stamp) * self.rate)
        self.stamp = now
        if tokens >= 1.0:
            self.tokens = tokens - 1.0
            return 0.0
        self.tokens = tokens
        return (1.0 - tokens) / self.rate


class KeyedBuckets:
    """A `TokenBucket` per key (a user), for requests that hold no connection of their own
    (the HTTP edge). `prune` forgets buckets that have filled up again (the same as new), so
    memory is bounded by the keys active within the last `burst / rate` seconds."""

    __slots__ = ("rate", "burst", "_buckets")

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self._buckets: dict[str, TokenBucket] = {}

    def take(self, key: str, now: float) -> float:
        """`TokenBucket.take` on the key's bucket."""
        if self.rate <= 0:
            return 0.0
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, now)
        return bucket.take(now)

    def prune(self, now: float) -> None:
        full = [k for k, b in self._buckets.items() if b.tokens + (now - b.stamp) * b.rate >= b.burst]
        for key in full:
            del self._buckets[key]

    def __len__(self) -> int:
        return len(self._buckets)


def retry_after_ms(wait_s: float) -> int:
    """A wait in whole milliseconds, never 0 (a client that retries at once is refused again)."""
    return max(1, math.ceil(wait_s * 1000))


class Strikes:
    """Counts events in a sliding window: `add` is True once `limit` of them fall within
    `window_s`. Limit 0: never. Memory: at most `limit` timestamps."""

    __slots__ = ("limit", "window_s", "_times")

    def __init__(self, limit: int, window_s: float) -> None:
        self.limit = limit
        self.window_s = window_s
        self._times: deque[float] = deque(maxlen=limit or 1)

    def add(self, now: float) -> bool:
        if self.limit <= 0:
            return False
        self._times.append(now)
        return len(self._times) == self.limit and now - self._times[0] <= self.window_s


class LogThrottle:
    """At most one log line per key per `interval_s`: `note` returns how many events the
    line stands for (this one and those kept quiet since the last line), or 0 to stay quiet."""

    __slots__ = ("interval_s", "_last", "_quiet")

    def __init__(self, interval_s: float = 60.0) -> None:
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._quiet: dict[str, int] = {}

    def note(self, key: str, now: float) -> int:
        last = self._last.get(key)
        if last is not None and now - last < self.interval_s:
            self._quiet[key] = self._quiet.get(key, 0) + 1
            return 0
        self._last[key] = now
        return 1 + self._quiet.pop(key, 0)
