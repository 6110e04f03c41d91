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

    def peek(self, seq: int, terminal: bool) -> Verdict:
        """What `offer` would answer, changing nothing."""
        if self.finished:
            return Verdict.DUPLICATE
        expected = self.last_seq if terminal else self.last_seq + 1
        if seq < expected:
            return Verdict.DUPLICATE
        if seq > expected:
            return Verdict.GAP
        return Verdict.DELIVER

    def offer(self, seq: int, terminal: bool) -> Verdict:
        verdict = self.peek(seq, terminal)
        if verdict is Verdict.DELIVER:
            if terminal:
                self.finished = True
            else:
                self.last_seq = seq
        return verdict
