"""Gap-free, duplicate-free delivery of one message's events to one client (pure).

Events come from two sources that overlap: a replay of the per-message log and the live
push. Positions: chunk `seq` n sits at position n; the terminal event sits right after the
last chunk. `SeqTracker` decides, for each incoming event, whether to deliver it, drop it
as already delivered, or ask the caller to re-read the log because something is missing.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Verdict(enum.Enum):
    DELIVER = "deliver"
    DUPLICATE = "duplicate"
    GAP = "gap"
    """Something between the last delivered event and this one is missing: re-read the log."""


@dataclass(slots=True)
class SeqTracker:
    last_seq: int = 0
    finished: bool = False

    def would_deliver(self, seq: int, terminal: bool) -> bool:
        """What `offer` would answer is DELIVER (nothing changes)."""
        if self.finished:
            return False
        if terminal:
            return seq == self.last_seq
        return seq == self.last_seq + 1

    def offer(self, seq: int, terminal: bool) -> Verdict:
        if self.finished:
            return Verdict.DUPLICATE
        if terminal:
            if seq < self.last_seq:
                return Verdict.DUPLICATE
            if seq > self.last_seq:
                return Verdict.GAP
            self.finished = True
            return Verdict.DELIVER
        if seq <= self.last_seq:
            return Verdict.DUPLICATE
        if seq > self.last_seq + 1:
            return Verdict.GAP
        self.last_seq = seq
        return Verdict.DELIVER
