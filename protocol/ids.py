"""Message ids: their one format, minted and checked here.

`m`, the creation time in milliseconds as 11 hex digits, then 64 random bits as 16 hex
digits: time-ordered and unguessable. A `message_id` from a client that does not have this
exact form was never issued, so it is answered `not_found` without building a Redis key
from it (PROTOCOL.md, "Ids").
"""

from __future__ import annotations

import os
import re
import time

MESSAGE_ID_RE = re.compile(r"m[0-9a-f]{11}[0-9a-f]{16}")


def new_message_id(now_s: float | None = None, random: bytes | None = None) -> str:
    """A fresh message id (`now_s` and `random` default to the clock and the OS's randomness)."""
    millis = int((time.time() if now_s is None else now_s) * 1000)
    entropy = os.urandom(8) if random is None else random
    if len(entropy) != 8:
        raise ValueError("a message id takes exactly 8 random bytes")
    return f"m{millis:011x}{entropy.hex()}"


def is_message_id(text: str) -> bool:
    """True when `text` has the form of an id the server issues."""
    return MESSAGE_ID_RE.fullmatch(text) is not None


def issued_ms(message_id: str) -> int:
    """When an id of `is_message_id`'s form was minted (Unix milliseconds)."""
    return int(message_id[1:12], 16)
