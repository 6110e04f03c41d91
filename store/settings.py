"""Lifetimes and bounds of everything kept in Redis."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Lifetimes:
    message_ttl_s: int = 3_600
    """Meta, log and cancel key of a queued or running message."""
    ended_ttl_s: int = 600
    """Meta and log after the terminal event: the window in which `resume` works."""
    grace_s: int = 30
    """Completed-message grace record: a late Stop answers already_completed."""
    detach_grace_s: float = 15.0
    """A generation nobody watches is cancelled after this long."""
    history_ttl_s: int = 7 * 86_400
    history_max_turns: int = 200
    jobs_maxlen: int = 100_000
    dead_maxlen: int = 10_000
    log_maxlen: int = 10_000
    backlog_limit: int = 10_000
    """Jobs queued and not yet claimed above which `chat` answers `overloaded`."""
    alive_ttl_ms: int = 3_000
    instance_ttl_s: int = 15

    @property
    def detach_grace_ms(self) -> int:
        return int(self.detach_grace_s * 1000)
