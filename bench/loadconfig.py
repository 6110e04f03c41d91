"""What a load test run is asked to do (`LoadConfig`), what each message will do (`Plan`),
and the figures every client adds to (`Results`)."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class LoadConfig:
    urls: list[str]
    clients: int = 10
    messages: int | None = 5
    duration_s: float | None = None
    max_tokens: int = 50
    cancel_rate: float = 0.0
    reconnect_rate: float = 0.0
    heartbeat_s: float = 0.0
    seed: int = 1
    user_prefix: str = "lt-"
    auth_secret: str | None = None
    terminal_timeout_s: float = 30.0
    cancel_result_timeout_s: float = 10.0
    connect_timeout_s: float = 10.0
    reconnect_window_s: float = 0.0
    """When no gateway accepts a connection: how long to keep trying (0: one round)."""
    ramp_s: float = 1.0
    run_id: str = "run"


@dataclass(slots=True)
class Results:
    """Figures shared by every client (one event loop: no locks needed)."""

    messages: int = 0
    accepted: int = 0
    terminals: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    cancels_sent: Counter[str] = field(default_factory=Counter)
    cancel_results: Counter[str] = field(default_factory=Counter)
    closes: Counter[str] = field(default_factory=Counter)
    reconnects: int = 0
    unplanned_reconnects: int = 0
    chunks: int = 0
    tokens: int = 0
    ttft_s: list[float] = field(default_factory=list)
    gaps_s: list[float] = field(default_factory=list)
    cancel_latency_s: list[float] = field(default_factory=list)
    heartbeat_rtt_s: list[float] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Plan:
    cancel_at: int | None = None
    """None: no cancel; -1: before `accepted` (by session_id); N >= 0: after N chunks."""
    cancel_secondary: bool = False
    drop_at: int | None = None
    """After this many chunks, drop the connection and resume on another gateway."""


def draw_plan(rng: random.Random, config: LoadConfig) -> Plan:
    cancel_at: int | None = None
    secondary = False
    if rng.random() < config.cancel_rate:
        secondary = rng.random() < 0.5
        if not secondary and rng.random() < 0.15:
            cancel_at = -1  # only on the same connection: its requests are handled in order
        else:
            cancel_at = rng.randint(0, max(config.max_tokens // 2, 0))
    drop_at = rng.randint(1, max(config.max_tokens - 1, 1)) if rng.random() < config.reconnect_rate else None
    return Plan(cancel_at, secondary, drop_at)
